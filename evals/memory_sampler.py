"""Host memory of a whole launch, sampled in a background thread: the process tree under the DeepSpeed
launcher (the launcher and every rank of the node), summed as PSS so pages that several ranks share (the
mmap'd master copy, the host KV store, libraries) count once in total. Started first thing, it sees the
start-up spikes (model load, AutoTP's temporary shards) that end-of-run snapshots miss.

    sampler = TreeMemorySampler(interval_s=0.1).start()   # on one rank of the node
    ...                                                   # the whole run
    sampler.mark("engine built")                          # a labelled sample; peak_between(a, b)
    sampler.stop(); sampler.peak, sampler.timeline        # bytes; [(seconds since start, bytes)]
"""
from __future__ import annotations

import os
import threading
import time

import psutil


def launch_root(proc: psutil.Process | None = None) -> psutil.Process:
    """The DeepSpeed launcher above this rank (its children are the node's ranks), else this process."""
    proc = proc or psutil.Process()
    parent = proc.parent()
    try:
        if parent is not None and "deepspeed" in " ".join(parent.cmdline()):
            return parent
    except psutil.Error:
        pass
    return proc


def process_memory(proc: psutil.Process) -> tuple[int, str]:
    """(bytes, kind): PSS where /proc lets us read it, RSS otherwise."""
    try:
        return proc.memory_full_info().pss, "pss"
    except (psutil.AccessDenied, AttributeError):
        return proc.memory_info().rss, "rss"


def tree_memory(root: psutil.Process) -> tuple[int, str]:
    total, kinds = 0, set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            nbytes, kind = process_memory(proc)
        except psutil.NoSuchProcess:        # a helper process ended between listing and reading
            continue
        total += nbytes
        kinds.add(kind)
    return total, "+".join(sorted(kinds))


class TreeMemorySampler:
    def __init__(self, interval_s: float = 0.1, root: psutil.Process | None = None):
        self.interval_s = interval_s
        self.root = root or launch_root()
        self.kind = ""
        self.peak, self.peak_at_s = 0, 0.0
        self.timeline: list[tuple[float, int]] = []
        self.marks: dict[str, tuple[float, int]] = {"start": (0.0, 0)}
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def sample(self) -> int:
        nbytes, self.kind = tree_memory(self.root)
        t = time.perf_counter() - self._t0
        self.timeline.append((t, nbytes))
        if nbytes > self.peak:
            self.peak, self.peak_at_s = nbytes, t
        return nbytes

    def mark(self, label: str) -> int:
        nbytes = self.sample()
        self.marks[label] = self.timeline[-1]
        return nbytes

    def peak_between(self, start: str, end: str | None = None) -> int:
        """The largest sample from mark `start` to mark `end` (default: the last sample)."""
        t0 = self.marks[start][0]
        t1 = self.marks[end][0] if end else float("inf")
        return max((b for t, b in self.timeline if t0 <= t <= t1), default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except psutil.Error:
                pass
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()                       # the end state, whatever the timing

    def downsampled(self, points: int = 400) -> list[tuple[float, int]]:
        step = max(1, len(self.timeline) // points)
        return self.timeline[::step]


def is_node_leader() -> bool:
    """The rank that samples: local rank 0 (before any process group exists)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"
