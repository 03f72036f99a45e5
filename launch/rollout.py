"""GRPO on a verifiable toy task with rollouts from the live policy: `python launch/rollout.py --config
recipes/grpo.yaml [key.sub=value ...]`, on one process or under `deepspeed --num_gpus 2`.

Tracks reward, KL, the rollout/trainer logprob mismatch (`mismatch/*`; `tis/*` with `grpo.tis_cap`), rollout
tokens/s, weight-sync seconds and the rollout vs train share of every step in
wandb (offline unless configured) and `<tracking.output_dir>/metrics.jsonl`; `tracking.plot` saves the
reward curve. A bad recipe: one `error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/rollout.py", description=__doc__.split("\n\n")[0],
        epilog="recipe sections: model, dtype, task.{name,max_operand,format_bonus,seed}, grpo.{steps,"
               "prompts_per_step,group_size,max_tokens,temperature,lr,clip,kl_coef,micro_batch,zero_stage,"
               "grad_clip,tis_cap}, rollout.{parallel,kv_device_gb,kv_host_gb,bucket_mb,max_num_seqs}, "
               "tracking.{output_dir,wandb_project,wandb_mode,plot}")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/grpo.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides (YAML values)")
    args = parser.parse_args(argv)

    from seesaw_ds.rollout.recipe import RecipeError, load_grpo_recipe
    try:
        recipe = load_grpo_recipe(args.config, args.overrides)
    except RecipeError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    from seesaw_ds.distributed.builder import share_cores
    share_cores()                                  # the cores shared out among this machine's ranks
    from seesaw_ds.rollout.loop import run
    try:
        run(recipe, announce=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
