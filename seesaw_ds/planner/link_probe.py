"""One rank of a link probe: the link between two hosts timed as the engine uses it, results as JSON.

    deepspeed ... seesaw_ds/planner/link_probe.py --out probe.json      # one rank on each of 2 hosts

Run by DeepSpeed's launcher on each host (e.g. through `launch/local_cluster.py`); ranks 0 and 1 meet over the
default process group (gloo), as the engine's ranks do. A job over several nodes runs `probe` itself, between
its first two nodes over a group of their own (jobs/job_cluster.py). Two things cross a link between hosts:
- the AutoTP all-reduce of a TP layout (decode: b x H activations and b x V logits; prefill: tokens x H),
  which across hosts is the process group's all-reduce (DeepSpeed's shared-memory op spans one host only);
- the pipeline's sends of a PP layout (a micro-batch's activations, one way: stage 0 -> stage 1).
Each is timed at buffer sizes from `--min-bytes` to `--max-bytes` (x4 apart) in two regimes:
- `sustained`: calls back to back, so a token-bucket shaped link runs at its sustained rate;
- `idle`: each call after `--idle` seconds without traffic (a refilled bucket), as a call that follows compute.
Small all-reduces (decode's activations, up to `BETWEEN_COMPUTE_MAX_BYTES`) are also timed `between_compute`:
each after a millisecond of matmuls on both ranks, as a decode layer's all-reduces follow its compute, minus
that compute alone (where ranks share cores, the call then waits for the transport's threads to be run).
A send is timed one way: back to back, the receiver acknowledges a run of sends; idle, a ping-pong whose
small reply is subtracted (half a small-message round trip). Rank 0 writes {"allreduce"|"p2p": {"sizes": [..],
"sustained": [s..], "idle": [s..]}}; `link_fit.fit_probe` turns it into latency and bandwidth figures.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

SUSTAINED_SECONDS = 0.3     # per size, back to back
IDLE_REPEATS = 3
BETWEEN_COMPUTE_MAX_BYTES = 16384
BETWEEN_COMPUTE_WORK_S = 1e-3    # compute before each call: about a decode layer's share between its all-reduces


def agreed_count(probe_seconds: float, budget: float, low: int = 2, high: int = 50, group=None) -> int:
    """Iterations for a loop of about `budget` seconds, the same on both ranks (the larger wish wins)."""
    want = torch.tensor([max(low, min(high, int(budget / max(probe_seconds, 1e-6))))])
    dist.all_reduce(want, op=dist.ReduceOp.MAX, group=group)
    return int(want)


def sustained(fn, group=None) -> float:
    """Seconds per call of `fn` back to back."""
    fn()
    start = time.perf_counter()
    fn()
    iters = agreed_count(time.perf_counter() - start, SUSTAINED_SECONDS, group=group)
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def idle(fn, pause: float, repeats: int = IDLE_REPEATS, group=None) -> float:
    """Seconds of one call of `fn` after `pause` seconds without traffic: the fastest of `repeats` (a busy
    machine only adds time)."""
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        time.sleep(pause)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def between_compute(fn, work_s: float = BETWEEN_COMPUTE_WORK_S, group=None) -> float:
    """Seconds one call of `fn` adds to a loop where each call follows `work_s` of matmuls on both ranks."""
    a = torch.randn(384, 384)
    start = time.perf_counter()
    for _ in range(20):
        torch.mm(a, a)
    reps = agreed_count((time.perf_counter() - start) / 20, work_s, low=1, high=10_000, group=group)

    def work():
        for _ in range(reps):
            torch.mm(a, a)

    def loop(with_call: bool, iters: int) -> float:
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(iters):
            work()
            if with_call:
                fn()
        return time.perf_counter() - start
    iters = agreed_count(loop(True, 2) / 2, SUSTAINED_SECONDS, high=500, group=group)
    return max((loop(True, iters) - loop(False, iters)) / iters, 1e-7)


def probe_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Buffer sizes from `min_bytes` to `max_bytes`, x4 apart."""
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= 4
    return sizes


def probe(rank: int, sizes: list[int], pause: float, group=None, peer: int | None = None) -> dict:
    """The probe's times between this rank and `peer` (global ranks; `rank` is 0 or 1 within the pair, whose
    process group is `group`: None for a world of two)."""
    peer = 1 - rank if peer is None else peer
    ack = torch.zeros(1)
    small = [n for n in sizes if n <= BETWEEN_COMPUTE_MAX_BYTES]
    out = {"allreduce": {"sizes": sizes, "sustained": [], "idle": [],
                         "between_compute": {"sizes": small, "seconds": []}},
           "p2p": {"sizes": sizes, "sustained": [], "idle": []}}
    for nbytes in sizes:
        buf = torch.ones(max(1, nbytes // 4))          # float32, as the engine's activations
        out["allreduce"]["sustained"].append(sustained(lambda: dist.all_reduce(buf, group=group), group))
        out["allreduce"]["idle"].append(idle(lambda: dist.all_reduce(buf, group=group), pause, group=group))

    def ping_pong(buf):
        if rank == 0:
            dist.send(buf, peer)
            dist.recv(ack, peer)
        else:
            dist.recv(buf, peer)
            dist.send(ack, peer)
    small_round_trip = idle(lambda: ping_pong(torch.zeros(1)), pause, repeats=2 * IDLE_REPEATS, group=group)
    for nbytes in sizes:
        buf = torch.ones(max(1, nbytes // 4))
        count = [1]

        def stream():                                   # `count` sends one way, one small reply
            for _ in range(count[0]):
                (dist.send if rank == 0 else dist.recv)(buf, peer)
            (dist.recv if rank == 0 else dist.send)(ack, peer)
        count[0] = agreed_count(idle(stream, 0.0, repeats=1, group=group), SUSTAINED_SECONDS / 3, low=1, high=20,
                                group=group)
        per_send = sustained(stream, group) / count[0]
        out["p2p"]["sustained"].append(per_send)
        out["p2p"]["idle"].append(max(idle(lambda: ping_pong(buf), pause, group=group) - small_round_trip / 2,
                                      1e-7))
    for nbytes in small:        # last, so the regimes above are timed as before (a shaped link's bucket full)
        buf = torch.ones(max(1, nbytes // 4))
        out["allreduce"]["between_compute"]["seconds"].append(
            between_compute(lambda: dist.all_reduce(buf, group=group), group=group))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--min-bytes", type=int, default=256)
    parser.add_argument("--max-bytes", type=int, default=16 * 2 ** 20)
    parser.add_argument("--idle", type=float, default=0.05, help="seconds without traffic before an idle call")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)   # DeepSpeed's launcher
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit(f"error: link_probe needs exactly 2 ranks, got {dist.get_world_size()}")
    started = time.perf_counter()
    result = probe(rank, probe_sizes(args.min_bytes, args.max_bytes), args.idle)
    result["meta"] = {"seconds": time.perf_counter() - started, "idle_pause": args.idle,
                      "created": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()[0]}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
