"""Shared memory of the node: where our files go (`shm_dir`), and the cleanup of DeepSpeed's CPU all-reduce
buffers, which it leaves in /dev/shm. Standard library only, so a calibration rank can use it without
importing the engine."""
from __future__ import annotations

import glob
import os


def shm_dir() -> str:
    """/dev/shm where the node has it (memory shared by every process of the node), else TMPDIR."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


def cleanup_deepspeed_shm() -> None:
    """Remove this rank's buffers (`..._<addr>_<port>_<rank>`, from MASTER_PORT and RANK); DeepSpeed does
    not at exit."""
    port, rank = os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
