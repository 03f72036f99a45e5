"""DeepSpeed's shared-memory all-reduce on CPU ranks leaves its buffers in /dev/shm. Standard library only,
so a calibration rank can use it without importing the engine."""
from __future__ import annotations

import glob
import os


def cleanup_deepspeed_shm() -> None:
    """Remove this rank's buffers (`..._<addr>_<port>_<rank>`, from MASTER_PORT and RANK); DeepSpeed does
    not at exit."""
    port, rank = os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
