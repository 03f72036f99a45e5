"""The node this process runs on, as a short key that names the node's shared resources (/dev/shm files).

Two "nodes" can share one /dev/shm: network-namespaced hosts on one machine (`launch/local_cluster.py`), or
containers of one box with /dev/shm mounted from the host. Keying each node-wide file by its node keeps their
files apart and says whose a leftover is. Standard library only.

    node_key()    # "$SEESAW_NODE_KEY" when set (the test cluster sets "<cluster prefix>-h<i>"), else
                  # "<hostname>-<network namespace inode>": distinct between namespaced hosts of one machine,
                  # and between machines of a real cluster by their host names
"""
from __future__ import annotations

import os
import socket

NODE_KEY_ENV = "SEESAW_NODE_KEY"
MAX_KEY_CHARS = 48


def sanitize(text: str) -> str:
    """Letters, digits, '-', '_' and '.' only (a safe piece of a file name), at most MAX_KEY_CHARS."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:MAX_KEY_CHARS]


def network_namespace_id() -> str:
    """The inode of this process's network namespace ('' where /proc has no namespaces)."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return ""


def node_key() -> str:
    """The key of this node (see the module docstring); never empty."""
    explicit = sanitize(os.environ.get(NODE_KEY_ENV, "").strip())
    if explicit:
        return explicit
    parts = [sanitize(socket.gethostname().split(".")[0])[:32] or "node", network_namespace_id()]
    return "-".join(p for p in parts if p)
