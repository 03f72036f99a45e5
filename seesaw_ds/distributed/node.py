"""The node this process runs on, as a short key that names the node's shared resources (/dev/shm files).

Two "nodes" can share one /dev/shm: network-namespaced hosts on one machine (`launch/local_cluster.py`), or
containers of one box with /dev/shm mounted from the host. Keying each node-wide file by its node keeps their
files apart and says whose a leftover is. Standard library only.

    node_key()    # "$SEESAW_NODE_KEY" when set (the test cluster sets "<cluster prefix>-h<i>"), else
                  # "<hostname>-<network namespace inode>": distinct between namespaced hosts of one machine,
                  # and between machines of a real cluster by their host names
    boot_id()     # equal exactly for processes of one machine
    shm_domain(d)  # "<boot id>:<device of d>": equal exactly for processes that map the same files under d
                   # (the node's /dev/shm), whatever their node keys
    free_port()    # a TCP port free on this node now (a rendezvous port for ranks started here)
    usable_cores() # the cores this process may run on (its CPU affinity)
"""
from __future__ import annotations

import os
import socket

NODE_KEY_ENV = "SEESAW_NODE_KEY"
MAX_KEY_CHARS = 48
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def free_port() -> int:
    """A TCP port no socket of this node holds now (the machine is shared: never assume 29500 is free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def boot_id() -> str:
    """The running kernel's boot id: equal exactly for processes of one machine ('' without /proc)."""
    try:
        with open(BOOT_ID, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def shm_domain(directory: str) -> str:
    """Which processes share the files under `directory` (the node's /dev/shm): the running kernel's boot id
    and the directory's filesystem device. Namespaced hosts or containers that mount one machine's /dev/shm
    get the same value; separate machines differ by boot id, private /dev/shm mounts of one machine by device.
    Without a boot id (no /proc) the node key stands in: distinct nodes are then never taken as sharing."""
    boot = boot_id()
    try:
        device = str(os.stat(directory).st_dev)
    except OSError:
        device = ""
    return f"{boot}:{device}" if boot and device else f"node:{node_key()}"
