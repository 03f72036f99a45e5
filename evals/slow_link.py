"""Layouts across a slow link: static TP2, static PP2 and PP2 -> TP2 on 2 namespaced hosts x 1 rank
(`launch/local_cluster.py`, needs root) at several link rates, side by side in one run.

    sudo python evals/slow_link.py                                    # unlimited and 200mbit (25 MB/s)
    sudo python evals/slow_link.py --links unlimited,200mbit,50mbit --workloads arxiv --scale 0.125

Every row is the same engine row as evals/throughput.py (evals/peers/seesaw_runner.py: same token ids,
greedy, EOS ignored, timed after a warm-up), started by DeepSpeed's launcher on each host with the link shaped
by tc's token bucket. Why ~25 MB/s: a PCIe A10 box has ~125 TFLOP/s of compute over ~16 GB/s of link, i.e.
~8 kFLOP per byte moved; a rank here does ~200 GFLOP/s, so the same ratio is ~25 MB/s = 200mbit.

Writes `--out` (JSON: every run's result rows) and prints, per link rate and workload, each layout's
tokens/s, its ratio to the best static layout at that rate, and the planner's predicted ratio (the calibrated
local 2-rank cluster, `seesaw_ds.planner.calibrate`, with its all-reduce and pipeline-send figures replaced
by a ring over the shaped link).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evals.workloads import build_workloads, parse_workload_names, workload_file_payload  # noqa: E402

LAYOUTS = {"TP2": {"tp": 2}, "PP2": {"pp": 2}, "PP2->TP2": {"prefill": {"pp": 2}, "decode": {"tp": 2}}}
STATIC = ("TP2", "PP2")
RUNNER = REPO / "evals" / "peers" / "seesaw_runner.py"
CLUSTER = REPO / "launch" / "local_cluster.py"


def run_row(layout: str, link: str, model_dir: str, workload_file: Path, scratch: Path, dtype: str,
            timeout: float) -> dict:
    """One layout at one link rate on a fresh 2-host cluster; the runner's result (or a failure record)."""
    tag = f"{layout.replace('->', '-')}-{link}"
    out, log = scratch / f"{tag}.json", scratch / f"{tag}.log"
    shaping = [] if link == "unlimited" else ["--link", link]
    cmd = [sys.executable, str(CLUSTER), "--hosts", "2", "--ranks", "1", *shaping, "--",
           str(RUNNER), "--model", model_dir, "--workloads", str(workload_file), "--out", str(out),
           "--dtype", dtype, "--threads", "1", "--layout", layout,
           "--llm-kwargs", json.dumps({"parallel": LAYOUTS[layout]})]
    print(f"== {layout} at {link}: log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    elapsed = time.perf_counter() - start
    if code == 0 and out.is_file():
        result = json.loads(out.read_text())
        result.update(link=link, process_s=elapsed)
        return result
    tail = log.read_text(errors="replace").splitlines()[-12:]
    print(f"   FAILED ({code}) after {elapsed:.0f} s:\n     " + "\n     ".join(tail), flush=True)
    return {"layout": layout, "link": link, "failed": str(code), "log_tail": tail, "results": []}


PLANNER_LABELS = {"TP2": "TP2xPP1xDP1", "PP2": "TP1xPP2xDP1", "PP2->TP2": "TP1xPP2xDP1 -> TP2xPP1xDP1"}


def link_cluster(base, link: str):
    """The calibrated 2-rank ClusterSpec with its all-reduce and point-to-point figures set by the link:
    a ring over full-duplex links of `link` each way (unlimited: the calibration as measured)."""
    import dataclasses
    from launch.local_cluster import rate_bits
    from seesaw_ds.planner.clusters import ring_allreduce_table
    if link == "unlimited":
        return base
    bandwidth = rate_bits(link) / 8
    ar_bw, ar_lat = ring_allreduce_table(bandwidth, max(base.p2p_latency, 1e-4), max_degree=2)
    return dataclasses.replace(base, allreduce_bandwidth=ar_bw, allreduce_latency=ar_lat,
                               p2p_bandwidth=min(bandwidth, base.p2p_bandwidth),
                               p2p_latency=max(base.p2p_latency, 1e-4))


def predicted_ratios(model_dir: str, workloads: dict, links: list[str], dtype: str) -> dict:
    """{(link, workload, layout): predicted tokens/s over the best predicted static (TP2 or PP2)}."""
    from seesaw_ds.models.loader import load_model_config
    from seesaw_ds.planner.api import plan
    from seesaw_ds.planner.calibrate import local_cluster
    from seesaw_ds.planner.search import PlannerOptions
    cfg, base, out = load_model_config(model_dir), local_cluster(2), {}
    for link in links:
        spec = link_cluster(base, link)
        for name, reqs in workloads.items():
            prompt = sum(len(r.prompt_token_ids) for r in reqs) / len(reqs)
            output = sum(r.output_len for r in reqs) / len(reqs)
            result = plan(cfg, spec, f"{prompt:.0f}/{output:.0f}/{len(reqs)}", PlannerOptions(dtype=dtype))
            rates = {c.label: c.tokens_per_s for c in result.ranked}
            best = max(rates.get(PLANNER_LABELS[s], 0.0) for s in STATIC)
            for layout, label in PLANNER_LABELS.items():
                if label in rates and best:
                    out[(link, name, layout)] = rates[label] / best
    return out


def table(runs: list[dict], predicted: dict | None = None) -> tuple[str, list[dict]]:
    """Rows (link, workload, layout, prompt+output tokens/s, ratio to the best static layout) and their text
    table, with whether every row produced the same output tokens."""
    rates, digests = {}, {}
    for run in runs:
        for res in run.get("results", []):
            key = (run["link"], res["workload"], run["layout"])
            rates[key] = (res["prompt_tokens"] + res["generated_tokens"]) / res["wall_s"]
            digests.setdefault(res["workload"], set()).add(tuple(res.get("output_digests", ())))
    predicted = predicted or {}
    rows, lines = [], [f"{'link':>10} {'workload':>9} {'layout':>9} {'tok/s':>8} {'/ best static':>13} "
                       f"{'predicted':>9}"]
    for link, workload in dict.fromkeys((k[0], k[1]) for k in rates):
        best = max((rates.get((link, workload, s), 0.0) for s in STATIC), default=0.0)
        for layout in LAYOUTS:
            tok_s = rates.get((link, workload, layout))
            ratio = tok_s / best if tok_s and best else None
            guess = predicted.get((link, workload, layout))
            rows.append({"link": link, "workload": workload, "layout": layout, "tok_s": tok_s,
                         "ratio_to_best_static": ratio, "predicted_ratio": guess})
            lines.append(f"{link:>10} {workload:>9} {layout:>9} {tok_s or float('nan'):8.1f} "
                         f"{ratio if ratio is not None else float('nan'):13.3f} "
                         f"{guess if guess is not None else float('nan'):9.3f}")
    for workload, seen in digests.items():
        lines.append(f"{workload}: output tokens {'identical' if len(seen) == 1 else 'DIFFER'} across rows")
    return "\n".join(lines), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2", help="model spec for seesaw_ds.models.loader")
    p.add_argument("--links", default="unlimited,200mbit", help="comma list of link rates (tc units) or unlimited")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of: {', '.join(LAYOUTS)}")
    p.add_argument("--workloads", default="arxiv,sharegpt")
    p.add_argument("--scale", type=float, default=0.125, help="multiply the workloads' request counts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--no-predict", action="store_true", help="skip the planner's prediction column")
    p.add_argument("--out", default=str(REPO / "evals" / "results" / "slow_link.json"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: slow_link.py needs root (it builds namespaced hosts with launch/local_cluster.py)",
              file=sys.stderr)
        return 2
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        print(f"error: unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    try:
        names = parse_workload_names(args.workloads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoConfig, AutoTokenizer
    from seesaw_ds.models.loader import resolve_model_folder
    model_dir = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workloads = build_workloads(names, tokenizer, AutoConfig.from_pretrained(model_dir).vocab_size, args.scale)
    runs = []
    with tempfile.TemporaryDirectory(prefix="slow-link-") as scratch_dir:
        scratch = Path(scratch_dir)
        workload_file = scratch / "workloads.json"
        workload_file.write_text(json.dumps(workload_file_payload(workloads)))
        for link in links:
            for layout in layouts:
                runs.append(run_row(layout, link, model_dir, workload_file, scratch, args.dtype, args.timeout))
    predicted = {}
    if not args.no_predict:
        try:
            predicted = predicted_ratios(model_dir, workloads, links, args.dtype)
        except Exception as err:  # noqa: BLE001 - the measured table stands without the prediction
            print(f"no planner prediction: {type(err).__name__}: {err}", flush=True)
    text, rows = table(runs, predicted)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": {"model": args.model, "dtype": args.dtype, "scale": args.scale,
                                                   "hosts": 2, "ranks_per_host": 1, "links": links},
                                          "rows": rows, "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all("failed" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
