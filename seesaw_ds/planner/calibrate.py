"""Describe this machine as a ClusterSpec by micro-benchmarks over the real backend (gloo ranks).

Each of N ranks is a process with one thread (as a seesaw_ds rank runs). All ranks measure at once, so
shared resources (memory bus, caches) are measured under the load a real run puts on them:
- matmul FLOP/s per dtype (float32, bfloat16), 1024^2 x 1024^2; the slowest rank counts;
- memory copy bandwidth, bytes read + written per second, 64 MiB buffers; the slowest rank counts;
- FLOP/s of decode's few-row linears over 256 MiB of weights, with every rank running them, then on rank 0
  alone while the others wait: a rank whose neighbours idle runs faster (it has the memory bus and the
  shared caches to itself), as the last stage of a pipeline does while it computes the LM head;
- all-reduce latency (1 KiB) and bandwidth (4 MiB) at each degree 2..N over ranks 0..k-1, both the process
  group's (gloo) and DeepSpeed's inference all-reduce (a shared-memory op on CPU ranks, what AutoTP calls);
- the same figures on rank 0 alone with a thread per core (`whole_machine`): one rank that folds the
  machine's ranks into itself, which the job's planner weighs against the N-rank layouts;
- the fixed cost of one decoder-layer call (a tiny transformers Llama layer: dispatch, no real work);
- point-to-point latency and bandwidth (ping-pong between ranks 0 and 1).
Memory split (an assumption: on a CPU the "device" and the host tier share RAM): `DEVICE_MEMORY_SHARE`
of RAM is the ranks' device memory, the rest the host tier, each divided evenly among the ranks. The
host link is the memory copy bandwidth.

Results are cached as JSON under $SEESAW_CACHE (or ~/.cache/seesaw_ds/) and reused unless recalibrating.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import psutil

from seesaw_ds.distributed.node import free_port, usable_cores
from seesaw_ds.planner import calibration_rank
from seesaw_ds.planner.clusters import ClusterSpec, DeviceSpec

CACHE_VERSION = 6
DEVICE_MEMORY_SHARE = 0.5
_MEASURE_SECONDS = 0.25      # per measurement loop
_RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration_rank.py")
_RANK_TIMEOUT = 300


def cache_dir() -> str:
    return os.environ.get("SEESAW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seesaw_ds")


def calibration_path(num_ranks: int) -> str:
    return os.path.join(cache_dir(), f"calibration_local_{num_ranks}ranks.json")


def default_num_ranks() -> int:
    return usable_cores()


def measure(num_ranks: int, seconds: float = _MEASURE_SECONDS) -> dict:
    """Spawn `num_ranks` gloo ranks, run the micro-benchmarks (each loop about `seconds`), return the
    merged measurements."""
    import runpy

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seesaw_calib_") as tmp:
        args = dict(world=num_ranks, init_file=os.path.join(tmp, "rendezvous"), out_dir=tmp,
                    spawned_at=time.perf_counter(), seconds=seconds, port=free_port())
        procs = [context.Process(target=runpy.run_path, args=(_RANK_SCRIPT,),
                                 kwargs=dict(init_globals={"RANK_ARGS": dict(args, rank=rank)},
                                             run_name=calibration_rank.RUN_NAME))
                 for rank in range(num_ranks)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + _RANK_TIMEOUT
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        failed = [rank for rank, proc in enumerate(procs) if proc.exitcode != 0]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
        if failed:
            raise RuntimeError(f"calibration rank(s) {failed} failed or timed out after {_RANK_TIMEOUT}s")
        ranks = []
        for r in range(num_ranks):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return {
        "matmul_flops": {k: min(r["matmul_flops"][k] for r in ranks) for k in ranks[0]["matmul_flops"]},
        "copy_bandwidth": min(r["copy_bandwidth"] for r in ranks),
        "decode_linear_flops": {dtype: {rows: min(r["decode_linear_flops"][dtype][rows] for r in ranks)
                                        for rows in by_rows}
                                for dtype, by_rows in ranks[0]["decode_linear_flops"].items()},
        "decode_linear_flops_solo": ranks[0].get("decode_linear_flops_solo"),
        "whole_machine": ranks[0].get("whole_machine"),
        "allreduce": ranks[0]["allreduce"],
        "tp_allreduce": ranks[0].get("tp_allreduce"),
        "layer_overhead": max(r["layer_overhead"] for r in ranks),
        "p2p": ranks[0].get("p2p"),
        "phase_seconds": ranks[0]["phase_seconds"],
    }


def cluster_from_measurements(measured: dict, num_ranks: int, total_memory: float) -> ClusterSpec:
    """The TP all-reduce table is DeepSpeed's inference all-reduce (what AutoTP calls) where measured,
    else the process group's all-reduce."""
    allreduce = measured.get("tp_allreduce") or measured["allreduce"]
    degrees = sorted(int(k) for k in allreduce)
    copy_bw = measured["copy_bandwidth"]
    p2p = measured.get("p2p") or {"latency": 0.0, "bandwidth": copy_bw}
    device = DeviceSpec(name="local-cpu-rank", memory_bytes=total_memory * DEVICE_MEMORY_SHARE / num_ranks,
                        memory_bandwidth=copy_bw, flops=tuple(measured["matmul_flops"].items()),
                        layer_overhead=measured.get("layer_overhead", 0.0),
                        decode_flops=tuple((dtype, int(rows), rate)
                                           for dtype, by_rows in measured.get("decode_linear_flops", {}).items()
                                           for rows, rate in by_rows.items()),
                        solo_speedup=solo_speedup(measured))
    return ClusterSpec(
        name="local", device=device, num_devices=num_ranks,
        allreduce_bandwidth=tuple(allreduce[str(k)]["bandwidth"] for k in degrees),
        allreduce_latency=tuple(allreduce[str(k)]["latency"] for k in degrees),
        p2p_bandwidth=p2p["bandwidth"], p2p_latency=p2p["latency"], host_link_bandwidth=copy_bw,
        host_memory_per_device=total_memory * (1 - DEVICE_MEMORY_SHARE) / num_ranks,
        source=f"calibrated {measured.get('created', '')}".strip())


def solo_speedup(measured: dict) -> float:
    """Median over the decode linears' (dtype, rows) of their rate on one rank alone over their rate with
    every rank busy; 1.0 when not measured (one rank), never below 1."""
    solo = measured.get("decode_linear_flops_solo")
    if not solo:
        return 1.0
    ratios = [solo[dtype][rows] / busy for dtype, by_rows in measured["decode_linear_flops"].items()
              for rows, busy in by_rows.items() if rows in solo.get(dtype, {})]
    return max(1.0, statistics.median(ratios)) if ratios else 1.0


def _machine_key(num_ranks: int) -> dict:
    import torch
    return {"version": CACHE_VERSION, "num_ranks": num_ranks, "host": platform.node(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__}


def cached_measurements(num_ranks: int) -> dict | None:
    """This machine's cached measurements for `num_ranks` ranks, or None (absent, or another machine's)."""
    path = calibration_path(num_ranks)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cached = json.load(f)
    return cached["measured"] if cached.get("key") == _machine_key(num_ranks) else None


def is_calibrated(num_ranks: int) -> bool:
    """True when no measuring is needed for `num_ranks` ranks."""
    return cached_measurements(num_ranks) is not None


def load_or_measure(num_ranks: int, recalibrate: bool = False, seconds: float = _MEASURE_SECONDS) -> dict:
    """Cached measurements for this machine and rank count; measure (and cache) when absent or asked."""
    cached = None if recalibrate else cached_measurements(num_ranks)
    if cached is not None:
        return cached
    path, key = calibration_path(num_ranks), _machine_key(num_ranks)
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        warnings.warn(f"calibrating while the machine is busy (1-min load {load_before:.1f}): the figures will "
                      f"be low; re-run with recalibrate on a quiet machine", RuntimeWarning, stacklevel=2)
    measured = measure(num_ranks, seconds)
    measured["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    measured["load_average_before"] = load_before
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.tmp"
    with open(tmp_path, "w") as f:
        json.dump({"key": key, "measured": measured}, f, indent=1)
    os.replace(tmp_path, path)
    return measured


def whole_machine_cluster(num_ranks: int, recalibrate: bool = False) -> ClusterSpec | None:
    """This machine as one rank with a thread per core, from the `num_ranks` calibration (None for one
    rank, whose calibration is a single thread, or a cache without the figures)."""
    measured = load_or_measure(num_ranks, recalibrate).get("whole_machine") if num_ranks > 1 else None
    if not measured:
        return None
    spec = cluster_from_measurements(measured, 1, float(psutil.virtual_memory().total))
    return dataclasses.replace(spec, name=f"local ({measured['threads']} threads)")


def local_cluster(num_ranks: int | None = None, recalibrate: bool = False) -> ClusterSpec:
    """This machine as `num_ranks` single-thread ranks (default: one per usable core)."""
    num_ranks = num_ranks or default_num_ranks()
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    measured = load_or_measure(num_ranks, recalibrate)
    return cluster_from_measurements(measured, num_ranks, float(psutil.virtual_memory().total))
