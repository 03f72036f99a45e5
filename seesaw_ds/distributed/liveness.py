"""Liveness of a job's ranks: no rank waits forever for a peer that is gone, and a stopped rank cleans up.

DeepSpeed's shared-memory all-reduce (AutoTP's row-parallel layers on CPUs) spins on a flag with no
timeout, and a process launched without the deepspeed launcher has nobody to stop it when a peer dies. So:

- `collective_timeout()`: the process group's timeout (gloo/NCCL collectives), $SEESAW_COLLECTIVE_TIMEOUT_S
  or a few minutes; long rank-0-only work is heart-beaten (`engine.comm.TorchComm.on_rank0_then_all`).
- `PeerWatch`: a daemon thread that polls the peers it can see (same boot and pid namespace: /proc) once a
  second. A peer that is gone while this rank's main thread sits in a collective for `GRACE_S` ends this
  rank: one `error: [rank R] ...` line, its /dev/shm files removed, exit status 1. A peer that is gone
  while this rank computes is left to the next collective (gloo raises; the shared-memory one is caught here).
- SIGTERM / SIGINT: the files this rank would leave in /dev/shm go at once; SIGTERM then unwinds the main
  thread (SystemExit 143), SIGINT raises KeyboardInterrupt as usual; if the main thread is stuck in a
  collective and cannot unwind, the watch thread ends the process after `GRACE_S`.

The thread needs the GIL, which DeepSpeed's all-reduce op releases while it spins.
"""
from __future__ import annotations

import datetime
import os
import select
import signal
import sys
import threading
import time

from seesaw_ds.distributed.shm_buffers import cleanup_on_stop

TIMEOUT_ENV = "SEESAW_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0
POLL_S = 1.0
GRACE_S = 5.0           # a collective raising on its own (gloo's closed connection) wins within this
COLLECTIVE_CODE = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}deepspeed{os.sep}comm{os.sep}")
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}


def collective_timeout() -> datetime.timedelta:
    """How long one collective may wait: $SEESAW_COLLECTIVE_TIMEOUT_S seconds (default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return datetime.timedelta(seconds=seconds)


def rank_label() -> str:
    return f"[rank {os.environ.get('RANK', '0')}]"


def say_fatal(message: str) -> None:
    """One line on stderr: `error: [rank R] message` (every rank prints its own)."""
    try:
        sys.stderr.write(f"error: {rank_label()} {' '.join(str(message).split())}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def process_identity(pid: int | str = "self") -> tuple[str, str, str] | None:
    """(boot id, pid namespace, start time) of a process, or None when it is gone or a zombie: two processes
    whose first two fields match can watch each other's pids."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in "ZX":
            return None
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            boot = f.read().strip()
        return boot, os.readlink(f"/proc/{pid}/ns/pid"), fields[19]
    except (OSError, IndexError):
        return None


class PeerWatch:
    """Watch the other ranks of the default process group (see the module docstring). Collective to start:
    every rank calls `PeerWatch.start()` right after the process group is made."""

    def __init__(self, rank: int, peers: dict[int, tuple[int, str]]):
        self.rank, self.peers = rank, peers            # peers: rank -> (pid, start time), the ones we can see
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        self._signal: int | None = None            # the last SIGTERM / SIGINT, seen by the watch thread
        self._wake_r = self._wake_w = -1
        self._thread = threading.Thread(target=self._run, name="seesaw-peer-watch", daemon=True)

    @classmethod
    def start(cls) -> "PeerWatch":
        import torch.distributed as dist
        me = process_identity()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (os.getpid(), me))
        rank = dist.get_rank()
        peers = {r: (pid, ident[2]) for r, (pid, ident) in enumerate(everyone)
                 if r != rank and me is not None and ident is not None and ident[:2] == me[:2]}
        watch = cls(rank, peers)
        watch._install_signal_handlers()
        watch._thread.start()
        return watch

    def stop(self) -> None:
        """Stop watching (the process group is being left on purpose); signal handlers go back to default."""
        self._stop.set()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            if self._wake_w >= 0:
                signal.set_wakeup_fd(-1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * POLL_S)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1

    # ---- signals -------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, self._on_signal)
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        theirs = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if theirs != -1:                  # someone else's (an event loop): keep theirs
            signal.set_wakeup_fd(theirs)
            os.close(r)
            os.close(w)
            return
        self._wake_r, self._wake_w = r, w

    def _on_signal(self, signum, frame) -> None:
        """Main thread: remove /dev/shm files now, then unwind (SIGTERM) or raise KeyboardInterrupt."""
        cleanup_on_stop()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        say_fatal(f"stopped by {signal.Signals(signum).name} (its /dev/shm files removed)")
        raise SystemExit(EXIT_STATUS[signal.SIGTERM])

    # ---- the watch thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        gone_since: float | None = None
        signalled_at: float | None = None
        while not self._stop.is_set():
            self._wait_for_signal_or_poll()
            if self._stop.is_set() or not _group_alive():
                return
            now = time.monotonic()
            stuck = _main_thread_in_collective()
            if self._signal is not None and signalled_at is None:
                signalled_at = now
            if signalled_at is not None and stuck and now - signalled_at >= GRACE_S:
                name = signal.Signals(self._signal).name
                self._end(EXIT_STATUS[self._signal], f"stopped by {name} while blocked in a collective "
                                                     f"(its /dev/shm files removed)")
            gone = self._gone_peers() if stuck else []
            if not gone:
                gone_since = None
                continue
            gone_since = gone_since or now
            if now - gone_since >= GRACE_S:
                names = ", ".join(f"rank {r} (pid {self.peers[r][0]})" for r in gone)
                self._end(1, f"{names} of this job ended while this rank waited for it in a collective; "
                             f"stopping this rank (its /dev/shm files removed)")

    def _wait_for_signal_or_poll(self) -> None:
        if self._wake_r < 0:
            self._stop.wait(POLL_S)
            return
        try:
            ready, _, _ = select.select([self._wake_r], [], [], POLL_S)
            data = os.read(self._wake_r, 64) if ready else b""
        except (OSError, ValueError):
            return
        for byte in data:
            if byte in EXIT_STATUS:
                self._signal = byte

    def _gone_peers(self) -> list[int]:
        gone = []
        for r, (pid, started) in self.peers.items():
            ident = process_identity(pid)
            if ident is None or ident[2] != started:
                gone.append(r)
        return gone

    def _end(self, status: int, message: str) -> None:
        with self._exiting:
            say_fatal(message)
            cleanup_on_stop()
            os._exit(status)


def _group_alive() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _main_thread_in_collective() -> bool:
    """True when the main thread's innermost frames are torch.distributed's or DeepSpeed's comm code."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    depth = 0
    while frame is not None and depth < 6:
        if any(part in frame.f_code.co_filename for part in COLLECTIVE_CODE):
            return True
        frame, depth = frame.f_back, depth + 1
    return False


_watch: list[PeerWatch] = []     # the one watch of this process's default process group


def watch_peers() -> None:
    """Start watching the default process group's peers (collective: every rank, right after it is made)."""
    if not _watch:
        _watch.append(PeerWatch.start())


def stop_watching() -> None:
    """Stop before leaving the process group on purpose."""
    while _watch:
        _watch.pop().stop()
