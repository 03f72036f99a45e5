"""Rank parallel layouts for a model, a cluster and a workload with the Seesaw throughput model.

    python launch/plan.py --model llama-2-70b --cluster 8xA10 --workload arxiv
    python launch/plan.py --model path/to/config.json --cluster local --workload 1536/64/32 --explain
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# NOTE: seesaw_ds is imported inside the functions: calibrating `local` spawns processes that re-run this
# file's top level, and they should not pay for importing the package.
def build_parser() -> argparse.ArgumentParser:
    from seesaw_ds.planner import CLUSTERS, WORKLOADS, PlannerOptions, bundled_model_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"HF config.json, a model folder, or one of: {', '.join(bundled_model_names())}")
    parser.add_argument("--cluster", default="local",
                        help=f"'<count>x<kind>' with kind in {', '.join(sorted(CLUSTERS))}, or 'local' "
                             f"(this machine, calibrated; '2xlocal' for 2 ranks). Default: local")
    parser.add_argument("--workload", default="sharegpt",
                        help=f"one of {', '.join(WORKLOADS)} or 'PROMPT/OUTPUT/REQUESTS' (mean lengths)")
    parser.add_argument("--num-requests", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--dtype", default="bfloat16", help="weights and KV dtype (default bfloat16)")
    parser.add_argument("--memory-utilization", type=float, default=0.9,
                        help="share of device memory for weights + KV (default 0.9)")
    parser.add_argument("--any-pp-order", action="store_true",
                        help="allow decode layouts with more pipeline stages than the prefill layout")
    budget = PlannerOptions.max_batched_tokens
    parser.add_argument("--max-batched-tokens", type=int, default=budget,
                        help=f"prompt tokens per prefill step, as the engine's max_num_batched_tokens (default "
                             f"{budget}; 0: no budget)")
    parser.add_argument("--steady-pipeline", action="store_true",
                        help="the paper's model: pp micro-batches in flight across steps, no fill-and-drain "
                             "bubble per step (default: the engine's pipeline pass, which drains every step)")
    parser.add_argument("--top", type=int, default=None, help="show only the best N candidates")
    parser.add_argument("--explain", action="store_true", help="print the time breakdown of each candidate")
    parser.add_argument("--recalibrate", action="store_true", help="re-measure the 'local' cluster")
    return parser


def main(argv: list[str] | None = None) -> int:
    from seesaw_ds.planner import PlannerOptions, parse_workload, plan
    from seesaw_ds.planner.report import describe_inputs, format_explain, format_table

    args = build_parser().parse_args(argv)
    steady = dict(prefill_micro_batches=None, decode_micro_batches=None, pipeline_drains=False)
    options = PlannerOptions(dtype=args.dtype, memory_utilization=args.memory_utilization,
                             decode_pp_at_most_prefill_pp=not args.any_pp_order,
                             max_batched_tokens=args.max_batched_tokens or None,
                             **(steady if args.steady_pipeline else {}))
    try:
        workload = parse_workload(args.workload, args.num_requests)
        result = plan(args.model, args.cluster, workload, options, recalibrate=args.recalibrate)
    except (ValueError, FileNotFoundError) as err:
        print(f"plan.py: {err}", file=sys.stderr)
        return 2
    print(describe_inputs(result))
    print()
    print(format_table(result, args.top))
    folded = whole_machine_line(result, workload, options)
    if folded:
        print(folded)
    if args.explain:
        print()
        print(format_explain(result, args.top))
    return 0


def whole_machine_line(result, workload, options) -> str:
    """On this machine calibrated as several ranks: one rank on every core, as a job weighs it ("" elsewhere)."""
    from seesaw_ds.jobs.world import FOLD_MARGIN
    from seesaw_ds.planner import plan
    from seesaw_ds.planner.calibrate import whole_machine_cluster
    n = result.cluster.num_devices
    cluster = whole_machine_cluster(n) if result.cluster.name == "local" and n > 1 else None
    if cluster is None:
        return ""
    one = plan(result.model, cluster, workload, options).best.tokens_per_s
    return (f"one rank on every core ({cluster.name}): {one:,.0f} tokens/s, {one / result.best.tokens_per_s:.2f}x "
            f"the best {n}-rank layout (a job's `parallel: seesaw` or `auto` runs it at >= {FOLD_MARGIN:.2f}x the "
            f"layouts it would run)")


if __name__ == "__main__":
    sys.exit(main())
