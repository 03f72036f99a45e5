"""Run a function on N real ranks (forked processes on gloo through DeepSpeed's CPU accelerator).

Forked workers reuse the parent's imports, so a multi-rank case costs seconds, not a launcher start-up.
"""
from __future__ import annotations

import glob
import json
import os
import traceback

import torch.multiprocessing as mp

from seesaw_ds.distributed.node import free_port


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import torch
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(result, f)
    except BaseException:
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist
        from seesaw_ds.distributed.builder import cleanup_deepspeed_shm
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        cleanup_deepspeed_shm()            # forked workers skip atexit handlers


def run_ranks(world: int, fn, *args, out_dir: str, timeout: float = 600):
    port = free_port()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = sorted(glob.glob(os.path.join(out_dir, "error-*.txt")))
    if errors:
        raise AssertionError("rank failed:\n" + open(errors[0]).read())
    if any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"rank exit codes {[p.exitcode for p in procs]}")
    leftovers = glob.glob(f"/dev/shm/*_{port}_*") + glob.glob("/dev/shm/seesaw-kv-*")
    assert not leftovers, f"files left in /dev/shm: {leftovers}"
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)
