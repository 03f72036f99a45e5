"""Shared memory of the node: where our files go (`shm_dir`), the files a rank must remove if it is stopped
(DeepSpeed's CPU all-reduce buffers, a store or a temp file not yet unlinked), and the start-up sweep of
files that a killed job left behind. Standard library only, so a calibration rank can use it without
importing the engine.

Who owns a file in /dev/shm is read from the kernel, not from its name: a file that no live process holds
open or mapped (`/proc/<pid>/fd`, `/proc/<pid>/maps`) and that is older than a few seconds belongs to a job
that is gone. Every such file of ours and of DeepSpeed's is swept at start-up.
"""
from __future__ import annotations

import glob
import os
import threading
import time

SWEPT_PREFIXES = ("seesaw-kv-", "seesaw-master-", "deepspeed_allreduce_buffer_")
MIN_STALE_AGE_S = 5.0        # a younger file may be one another job is creating right now

_pending: set[str] = set()   # paths this process created and would leave behind if stopped now
_pending_lock = threading.Lock()


def shm_dir() -> str:
    """/dev/shm where the node has it (memory shared by every process of the node), else TMPDIR."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


def deepspeed_buffers_of_this_job() -> list[str]:
    """Every rank's buffers of this job (same MASTER_PORT). Every rank maps all of them at init, so a name
    removed on the way out breaks no peer; a rank killed with -9 leaves its own, which this removes."""
    port = os.environ.get("MASTER_PORT", "")
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") if port else []


def deepspeed_buffers_of_this_rank() -> list[str]:
    """This rank's buffers (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`, from MASTER_PORT/RANK)."""
    port, rank = os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")
    if not port or not rank:
        return []
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_{rank}")


def cleanup_deepspeed_shm() -> None:
    """Remove this rank's DeepSpeed all-reduce buffers; DeepSpeed does not at exit."""
    for path in deepspeed_buffers_of_this_rank():
        _unlink(path)


def remember(path: str) -> None:
    """`path` is removed by `cleanup_on_stop` until `forget(path)` (call once the name is unlinked)."""
    with _pending_lock:
        _pending.add(path)


def forget(path: str) -> None:
    with _pending_lock:
        _pending.discard(path)


def cleanup_on_stop() -> list[str]:
    """Remove what a stopped rank would leave: the job's DeepSpeed buffers (a rank killed with -9 cannot
    remove its own) and every remembered path, then leftovers of other jobs that are gone. Safe from any
    thread and more than once. Returns the paths removed."""
    with _pending_lock:
        paths = sorted(_pending)
        _pending.clear()
    removed = [p for p in paths + deepspeed_buffers_of_this_job() if _unlink(p)]
    try:
        removed += sweep_stale_shm(min_age_s=1.0)    # a starting job maps its files within microseconds
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def files_in_use(paths: set[str]) -> set[str]:
    """The subset of `paths` that a live process (one we may inspect) holds open or mapped."""
    used: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target in paths:
                    used.add(target)
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        name = line.rstrip("\n").split(None, 5)[-1].removesuffix(" (deleted)")
                        if name in paths:
                            used.add(name)
        except OSError:         # the process ended meanwhile, or is not ours to inspect
            continue
        if used == paths:
            break
    return used


def sweep_stale_shm(min_age_s: float = MIN_STALE_AGE_S, directory: str = "/dev/shm") -> list[str]:
    """Remove this user's leftovers in /dev/shm (`seesaw-kv-*`, `seesaw-master-*`, DeepSpeed's all-reduce
    buffers) that no live process holds open or mapped and that are older than `min_age_s`. Returns the
    paths removed. A no-op where there is no /proc."""
    if not os.path.isdir(directory) or not os.path.isdir("/proc/self/fd"):
        return []
    now, uid, candidates = time.time(), os.getuid(), set()
    for name in os.listdir(directory):
        if not name.startswith(SWEPT_PREFIXES):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates.add(path)
    if not candidates:
        return []
    return sorted(p for p in candidates - files_in_use(candidates) if _unlink(p))
