"""Weight-sync cost of RolloutEngine against a plain copy of the model's bytes, on one process.

    python evals/rollout_sync.py [--model embedded:smollm2] [--stages 0 3] [--bucket-mb 64] [--repeats 3]

For each ZeRO stage: a DeepSpeed engine over the model (fp32, AdamW), a RolloutEngine beside it, then
`repeats` syncs; printed next to the time of `copy_` of every parameter into a preallocated buffer (the
floor a sync cannot beat on one node) as a ratio. Compare ratios within one run: absolute times move
with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _memcpy_seconds(module, repeats: int) -> tuple[float, int]:
    import torch
    params = [p.detach() for p in module.parameters()]
    buffers = [torch.empty_like(p) for p in params]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b, p in zip(buffers, params):
            b.copy_(p)
        best = min(best, time.perf_counter() - t0)
    return best, sum(p.numel() * p.element_size() for p in params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evals/rollout_sync.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=os.environ.get("MASTER_PORT", "29671")).items():
        os.environ.setdefault(key, value)
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.models.loader import resolve_model_folder
    from seesaw_ds.rollout import RolloutEngine
    init_distributed()
    folder = resolve_model_folder(args.model)
    rows = []
    for stage in args.stages:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        copy_s, nbytes = _memcpy_seconds(model, args.repeats)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config=config)
        rollout = RolloutEngine(engine, None, kv_device_gb=0.05, max_model_len=256, bucket_bytes=int(args.bucket_mb * (1 << 20)))
        syncs = [rollout.sync_weights() for _ in range(args.repeats + 1)][1:]     # the first allocates staging
        best = min(syncs, key=lambda r: r.seconds)
        row = {"zero_stage": stage, "model_mb": nbytes / 1e6, "memcpy_s": copy_s, "sync_s": best.seconds,
               "gather_s": best.gather_seconds, "buckets": best.buckets, "ratio": best.seconds / copy_s}
        rows.append(row)
        print(json.dumps(row), flush=True)
        rollout.close()
        del engine, rollout, model
    return 0


if __name__ == "__main__":
    sys.exit(main())
