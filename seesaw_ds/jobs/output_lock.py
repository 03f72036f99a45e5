"""One job per output folder: an exclusive lock file `<output.dir>/.seesaw-job.lock` held for the job's lifetime.

    lock = hold_output_lock(directory, announce=print)   # OutputError when another live job holds the folder
    ...write shards...
    lock.release()

The lock file is created with O_CREAT | O_EXCL and holds {"host", "pid", "started"} of its owner. A lock whose
owner is gone (same host, dead pid) is stale: it is taken over with a notice. A lock from another host cannot be
checked, so it is refused, naming the file to delete if that job is known to be over.
Holding is per process and counted: the job script and `run_recipe` may both hold the same folder.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from typing import Callable

from seesaw_ds.jobs.outputs import OutputError

LOCK_NAME = ".seesaw-job.lock"

_HELD: dict[str, "OutputLock"] = {}     # directory -> this process's lock on it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # alive, owned by another user
        return True
    return True


def _read_owner(path: str) -> dict | None:
    """The lock's owner record, or None if the file vanished; {} if it is unreadable (being written)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def other_live_owner(directory: str) -> str | None:
    """"pid P on host H, since T" when another job that may be alive holds `directory`'s lock, else None."""
    owner = _read_owner(os.path.join(directory, LOCK_NAME))
    if owner is None:
        return None
    host, pid = owner.get("host"), owner.get("pid")
    if host == socket.gethostname() and (pid == os.getpid() or (isinstance(pid, int) and not _pid_alive(pid))):
        return None
    return f"pid {pid} on host {host}, since {owner.get('started', '?')}"


class OutputLock:
    """This process's hold on one output folder (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.count = 0

    def _create(self) -> bool:
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def acquire(self, announce: Callable[[str], None]) -> None:
        for _ in range(3):     # a stale lock taken over by another job in between: look again
            if self._create():
                self.count = 1
                return
            owner = _read_owner(self.path)
            if owner is None:
                continue
            host, pid = owner.get("host"), owner.get("pid")
            held_by = f"pid {pid} on host {host}, since {owner.get('started', '?')}"
            if host == socket.gethostname() and isinstance(pid, int) and pid == os.getpid():
                raise OutputError(f"output.dir {self.directory} is locked by this process already ({self.path})")
            if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                announce(f"output: took over the stale lock of output.dir {self.directory} (its job, {held_by}, "
                         f"is gone)")
                continue
            if not owner:
                raise OutputError(f"output.dir {self.directory} is locked by another job ({self.path} is being "
                                  f"written or unreadable); use another output.dir")
            where = "is running" if host == socket.gethostname() else "may be running (another host: not checked)"
            raise OutputError(f"output.dir {self.directory} is in use by another job ({held_by}) that {where}; "
                              f"wait for it or use another output.dir (delete {self.path} only if that job is over)")
        raise OutputError(f"output.dir {self.directory}: could not take its lock {self.path}")

    def release(self) -> None:
        """Drop one hold; the last one removes the lock file (only if this process still owns it)."""
        if self.count <= 0:
            return
        self.count -= 1
        if self.count:
            return
        _HELD.pop(self.directory, None)
        owner = _read_owner(self.path)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise


def hold_output_lock(directory: str, announce: Callable[[str], None] = print) -> OutputLock:
    """Lock `directory` (created if missing) for this process, or add one hold to this process's lock on it."""
    directory = os.path.abspath(os.path.expanduser(directory))
    held = _HELD.get(directory)
    if held is not None and held.count > 0:
        held.count += 1
        return held
    os.makedirs(directory, exist_ok=True)
    lock = OutputLock(directory)
    lock.acquire(announce)
    _HELD[directory] = lock
    return lock


def release_held(directory: str | None) -> None:
    """Drop one hold of this process's lock on `directory`, if it has one."""
    if directory:
        held = _HELD.get(os.path.abspath(os.path.expanduser(directory)))
        if held is not None:
            held.release()
