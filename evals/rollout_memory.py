"""Peak host memory of GRPO steps (rollout + train) on one process, next to the bytes that explain it.

    python evals/rollout_memory.py [--steps 3] [--prompts 2] [--group 4] [--max-tokens 8] [--out FILE]

A small GRPO run (embedded:smollm2, fp32, AdamW, frozen reference with kl_coef > 0) with each step split
into its rollout phase (`generating()`: weight sync, KV tiers allocated, sampling) and its train phase
(forward/backward, optimizer step). Two meters: the process's own peak RSS per phase (VmHWM, reset through
/proc/self/clear_refs before each phase: exact) and the process tree's PSS sampled in a background thread
(evals/memory_sampler.py: sees children too, may miss spikes shorter than its interval). Beside them: the
bytes of the policy, its gradients and optimizer state, the reference model, the rollout weights and the
KV pool / host store; and, every step, whether leaving `generating()` handed the KV memory back (RSS drop
>= 80% of the KV bytes, pool tensor empty).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 2 ** 30


def reset_peak_rss() -> bool:
    """Start a new VmHWM window for this process (Linux >= 4.0); False where /proc refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(loop) -> dict[str, int]:
    """What the training side and the rollout side hold, by part (grads: between backward and the step)."""
    import torch
    params = list(loop.engine.module.parameters())
    state = [v for s in loop.engine.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    kv = loop.rollout.kv
    spec = kv.pool.spec
    return {"policy": _tensor_bytes(params), "grads": _tensor_bytes(p for p in params if p.requires_grad),
            "optimizer": _tensor_bytes(state),
            "reference": _tensor_bytes(loop.reference.parameters()) if loop.reference is not None else 0,
            "rollout_weights": loop.rollout.weight_sync.history[-1].nbytes,
            "kv_pool": spec.num_blocks * spec.bytes_per_block,
            "kv_host_store": kv.store.nbytes if kv.store is not None else 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evals/rollout_memory.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--kv-device-gb", type=float, default=0.25)
    parser.add_argument("--interval", type=float, default=0.05, help="tree sampler interval (s)")
    parser.add_argument("--out", default=os.path.join("evals", "results", "rollout_memory-1proc.json"))
    args = parser.parse_args(argv)

    from evals.memory_sampler import TreeMemorySampler
    from seesaw_ds.rollout.loop import GRPOLoop
    from seesaw_ds.rollout.recipe import RecipeError, load_grpo_recipe
    overrides = [f"grpo.steps={args.steps}", f"grpo.prompts_per_step={args.prompts}",
                 f"grpo.group_size={args.group}", f"grpo.max_tokens={args.max_tokens}",
                 f"grpo.micro_batch={args.prompts * args.group}", "dtype=float32",
                 f"rollout.kv_device_gb={args.kv_device_gb}", "tracking.wandb_mode=disabled", "tracking.plot=null",
                 f"tracking.output_dir={tempfile.mkdtemp(prefix='rollout-memory-')}"]
    try:
        recipe = load_grpo_recipe("recipes/grpo.yaml", overrides)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")

    sampler = TreeMemorySampler(interval_s=args.interval).start()
    exact = reset_peak_rss()
    loop = GRPOLoop(recipe, announce=lambda line: None)
    sampler.mark("built")
    built_hwm = peak_rss()
    steps = []
    for step in range(args.steps):
        reset_peak_rss()
        sampler.mark(f"rollout{step}")
        batch, info = loop.rollout_phase(step)
        rollout_hwm = peak_rss()
        mem = dict(loop.rollout.memory)
        pool_outside = loop.rollout.kv.pool_bytes
        reset_peak_rss()
        sampler.mark(f"train{step}")
        record = loop.train_phase(batch, info)
        train_hwm = peak_rss()
        sampler.mark(f"end{step}")
        steps.append({"step": step, "rollout_peak_rss": rollout_hwm, "train_peak_rss": train_hwm,
                      "rollout_peak_tree": sampler.peak_between(f"rollout{step}", f"train{step}"),
                      "train_peak_tree": sampler.peak_between(f"train{step}", f"end{step}"),
                      "rss_before": mem["before"], "rss_inside": mem["inside"], "rss_after": mem["after"],
                      "pool_bytes_outside": pool_outside, "rollout_s": record["rollout_s"],
                      "train_s": record["train_s"]})
    parts = model_bytes(loop)
    loop.close()
    sampler.stop()

    kv_bytes = parts["kv_pool"] + parts["kv_host_store"]
    for s in steps:
        s["kv_released"] = bool(s["pool_bytes_outside"] == 0 and s["rss_inside"] - s["rss_after"] >= 0.8 * kv_bytes)
    train_steps = steps[1:] or steps             # step 0's train phase also allocates the optimizer state
    summary = {
        "peak_rss_startup": built_hwm,
        "peak_rss_rollout": max(s["rollout_peak_rss"] for s in steps),
        "peak_rss_train": max(s["train_peak_rss"] for s in train_steps),
        "peak_rss_train_first_step": steps[0]["train_peak_rss"],
        "peak_rss_overall": max([built_hwm] + [max(s["rollout_peak_rss"], s["train_peak_rss"]) for s in steps]),
        "peak_tree_rollout": max(s["rollout_peak_tree"] for s in steps),
        "peak_tree_train": max(s["train_peak_tree"] for s in train_steps),
        "peak_tree_overall": sampler.peak, "tree_kind": sampler.kind,
        "rss_inside_minus_outside": min(s["rss_inside"] - s["rss_after"] for s in steps),
        "kv_released_every_step": all(s["kv_released"] for s in steps),
    }
    print(f"{'':<34}{'GiB':>8}")
    for key in ("peak_rss_startup", "peak_rss_rollout", "peak_rss_train", "peak_rss_train_first_step",
                "peak_rss_overall", "peak_tree_rollout", "peak_tree_train", "peak_tree_overall",
                "rss_inside_minus_outside"):
        print(f"{key:<34}{summary[key] / GB:>8.3f}")
    print("-- bytes held (GiB)")
    for key, value in parts.items():
        print(f"{key:<34}{value / GB:>8.3f}")
    print(f"{'policy+grads+optimizer+reference':<34}"
          f"{(parts['policy'] + parts['grads'] + parts['optimizer'] + parts['reference']) / GB:>8.3f}")
    print(f"KV handed back outside generating() every step: {summary['kv_released_every_step']} "
          f"(RSS drop {summary['rss_inside_minus_outside'] / GB:.3f} GiB vs KV {kv_bytes / GB:.3f} GiB)"
          + ("" if exact else "; VmHWM could not be reset: per-phase RSS peaks are cumulative"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "vmhwm_reset": exact, "summary": summary, "bytes": parts,
                   "steps": steps, "timeline": sampler.downsampled()}, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if summary["kv_released_every_step"] else 1


if __name__ == "__main__":
    sys.exit(main())
