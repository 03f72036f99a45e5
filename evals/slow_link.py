"""Layouts across a slow link: static TP2, static PP2 and PP2 -> TP2 on 2 namespaced hosts x 1 rank
(`launch/local_cluster.py`, needs root) at several link rates, measured side by side and next to the planner.

    sudo python evals/slow_link.py                          # unlimited and 200mbit, arxiv + sharegpt
    sudo python evals/slow_link.py --links unlimited,200mbit,50mbit --workloads arxiv --scale 0.25
    sudo python evals/slow_link.py --find-best               # the planner's largest-gain case (no engine run)
    sudo python evals/slow_link.py --model random:h1024-L8-kv2 --links 100mbit   # measure such a case

Every row is the same engine row as evals/throughput.py (evals/peers/seesaw_runner.py: same token ids,
greedy, EOS ignored, timed after a warm-up), started by DeepSpeed's launcher on each host with the link shaped
by tc's token bucket. Why ~25 MB/s: a PCIe A10 box has ~125 TFLOP/s of compute over ~16 GB/s of link, i.e.
~8 kFLOP per byte moved; a rank here does ~200 GFLOP/s, so the same ratio is ~25 MB/s = 200mbit.

Before the rows, each link is probed on the same 2-host cluster (`seesaw_ds/planner/link_probe.py`: gloo
all-reduce and one-way sends, back to back and after a pause) and fitted (`seesaw_ds/planner/link_fit.py`:
latency, line and sustained bandwidth, token-bucket depth). The prediction for a link is the local 2-rank
cluster (`seesaw_ds.planner.calibrate`: compute, memory; re-measured at the start of the run unless
`--reuse-calibration`) with its all-reduce and send costs replaced by that fit. `--probes FILE` reuses (or saves) the probes. Writes `--out` (JSON: probes, fits, rows, runs) and
prints, per link and workload, each layout's tokens/s, its ratio to the best static layout, the predicted
ratio and their gap (measured / predicted - 1; `!` past 25%).
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

from evals.slow_link_predict import find_best_report, fit_summary, link_specs, predicted_ratios  # noqa: E402
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
           "--llm-kwargs", json.dumps({"parallel": LAYOUTS[layout], "allow_cross_node_tp": True})]
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


PROBE = REPO / "seesaw_ds" / "planner" / "link_probe.py"
GAP_LIMIT = 0.25


def probe_link(link: str, scratch: Path, timeout: float) -> dict | None:
    """Time the link on a fresh 2-host cluster (link_probe.py); its result, or None when the probe failed."""
    out, log = scratch / f"probe-{link}.json", scratch / f"probe-{link}.log"
    shaping = [] if link == "unlimited" else ["--link", link]
    cmd = [sys.executable, str(CLUSTER), "--hosts", "2", "--ranks", "1", *shaping, "--", str(PROBE),
           "--out", str(out)]
    print(f"== probe at {link}: log {log}", flush=True)
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and out.is_file():
        return json.loads(out.read_text())
    print(f"   probe FAILED ({code}): " + " | ".join(log.read_text(errors="replace").splitlines()[-4:]), flush=True)
    return None


def random_model(label: str, tokenizer_dir: str) -> str:
    """A random-weight Llama of a link_search shape label (h1024-L8-kv2), with the embedded model's tokenizer,
    saved once under the cache."""
    import re
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from seesaw_ds.data.cache import cache_dir
    from seesaw_ds.planner.link_search import Shape
    match = re.fullmatch(r"h(\d+)-L(\d+)-kv(\d+)", label)
    if not match:
        raise ValueError(f"--model random:{label}: expected random:h<hidden>-L<layers>-kv<kv heads>")
    shape = Shape(*(int(g) for g in match.groups()))
    folder = cache_dir("slow_link") / f"random-{label}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        fields = {k: v for k, v in shape.hf_config().items() if k not in ("model_type", "architectures")}
        LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


def model_and_workloads(spec: str, names: list[str], scale: float) -> tuple[str, dict]:
    """(model folder of `spec`: a loader spec or random:<shape label>, the named workloads at `scale` for its
    tokenizer); ValueError for a bad random: label."""
    from transformers import AutoConfig, AutoTokenizer
    from seesaw_ds.models.loader import resolve_model_folder
    if spec.startswith("random:"):
        model_dir = random_model(spec.split(":", 1)[1], resolve_model_folder("embedded:smollm2"))
    else:
        model_dir = resolve_model_folder(spec)
    workloads = build_workloads(names, AutoTokenizer.from_pretrained(model_dir),
                                AutoConfig.from_pretrained(model_dir).vocab_size, scale)
    return model_dir, workloads


def table(runs: list[dict], predicted: dict | None = None) -> tuple[str, list[dict]]:
    """Rows (link, workload, layout, prompt+output tokens/s, ratio to the best static layout, predicted ratio,
    gap) and their text table, with whether every row produced the same output tokens."""
    rates, digests = {}, {}
    for run in runs:
        for res in run.get("results", []):
            key = (run["link"], res["workload"], run["layout"])
            rates[key] = (res["prompt_tokens"] + res["generated_tokens"]) / res["wall_s"]
            digests.setdefault(res["workload"], set()).add(tuple(res.get("output_digests", ())))
    predicted = predicted or {}
    nan = float("nan")
    rows, lines = [], [f"{'link':>10} {'workload':>9} {'layout':>9} {'tok/s':>8} {'/ best static':>13} "
                       f"{'predicted':>9} {'gap':>7}"]
    for link, workload in dict.fromkeys((k[0], k[1]) for k in [*rates, *predicted]):
        best = max((rates.get((link, workload, s), 0.0) for s in STATIC), default=0.0)
        for layout in LAYOUTS:
            tok_s = rates.get((link, workload, layout))
            ratio = tok_s / best if tok_s and best else None
            guess = predicted.get((link, workload, layout))
            gap = ratio / guess - 1 if ratio is not None and guess else None
            rows.append({"link": link, "workload": workload, "layout": layout, "tok_s": tok_s,
                         "ratio_to_best_static": ratio, "predicted_ratio": guess, "gap": gap})
            flag = "!" if gap is not None and abs(gap) > GAP_LIMIT else ""
            lines.append(f"{link:>10} {workload:>9} {layout:>9} {tok_s or nan:8.1f} "
                         f"{ratio if ratio is not None else nan:13.3f} {guess if guess is not None else nan:9.3f} "
                         f"{gap if gap is not None else nan:+7.1%}{flag}")
    for workload, seen in digests.items():
        lines.append(f"{workload}: output tokens {'identical' if len(seen) == 1 else 'DIFFER'} across rows")
    return "\n".join(lines), rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2",
                   help="model spec for seesaw_ds.models.loader, or random:h<hidden>-L<layers>-kv<kv heads>")
    p.add_argument("--links", default="unlimited,200mbit", help="comma list of link rates (tc units) or unlimited")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of: {', '.join(LAYOUTS)}")
    p.add_argument("--workloads", default="arxiv,sharegpt")
    p.add_argument("--scale", type=float, default=0.0625, help="multiply the workloads' request counts "
                                                                 "(default: arxiv 2, sharegpt 8 requests)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    p.add_argument("--no-predict", action="store_true", help="skip the probes and the planner's prediction")
    p.add_argument("--reuse-calibration", action="store_true",
                   help="take the cached local 2-rank calibration (compute, memory) instead of re-measuring it")
    p.add_argument("--probes", default=None, help="JSON of link probes: reused for the links it holds, and "
                                                  "the new probes are added to it")
    p.add_argument("--find-best", action="store_true",
                   help="no engine run: the planner's largest predicted PP2->TP2 gains over tiny Llama shapes, "
                        "the workloads and --find-links (probed links in --links, others scaled from them)")
    p.add_argument("--find-links", default="unlimited,1gbit,400mbit,200mbit,100mbit,50mbit,25mbit")
    p.add_argument("--find-max-seconds", type=float, default=300, help="longest predicted run of a layout")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--rows-from", default=None, help="no engine run: re-table the runs and probes of an earlier "
                                                     "--out with the current planner's predictions")
    p.add_argument("--out", default=str(REPO / "evals" / "results" / "slow_link.json"))
    args = p.parse_args(argv)
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    args.links = [x.strip() for x in args.links.split(",") if x.strip()]
    args.find_links = [x.strip() for x in args.find_links.split(",") if x.strip()]
    unknown = [x for x in args.layouts if x not in LAYOUTS]
    if unknown:
        p.exit(2, f"error: --layouts: unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}\n")
    from launch.local_cluster import rate_bits
    for link in args.links + args.find_links:
        if link != "unlimited":
            try:
                rate_bits(link)
            except ValueError as err:
                p.exit(2, f"error: --links / --find-links: {err}\n")
    try:
        args.workload_names = parse_workload_names(args.workloads)
    except ValueError as err:
        p.exit(2, f"error: --workloads: {err}\n")
    return args


def retable(args) -> int:
    """--rows-from: the earlier run's measured rows next to the current planner's prediction for its links."""
    earlier = json.loads(Path(args.rows_from).read_text())
    meta = earlier["meta"]
    model_dir, workloads = model_and_workloads(meta["model"], sorted({r["workload"] for r in earlier["rows"]}),
                                               meta["scale"])
    specs = link_specs(earlier["probes"], meta["links"])
    text, rows = table(earlier["runs"], predicted_ratios(model_dir, workloads, specs, meta["dtype"]))
    print(text)
    Path(args.out).write_text(json.dumps({**earlier, "rows": rows, "fits": {k: fit_summary(v) for k, v in specs.items()}},
                                         indent=1))
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rows_from:
        return retable(args)
    probes_path = Path(args.probes) if args.probes else None
    probes = json.loads(probes_path.read_text()) if probes_path and probes_path.is_file() else {}
    needs_cluster = not args.find_best or any(not probes.get(link) for link in args.links)
    if needs_cluster and os.geteuid() != 0:
        print("error: slow_link.py needs root (it builds namespaced hosts with launch/local_cluster.py)",
              file=sys.stderr)
        return 2
    try:
        model_dir, workloads = model_and_workloads(args.model, args.workload_names, args.scale)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs, predicted, specs = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="slow-link-") as scratch_dir:
        scratch = Path(scratch_dir)
        if not args.no_predict or args.find_best:
            for link in args.links:
                if not probes.get(link):
                    probes[link] = probe_link(link, scratch, min(args.timeout, 900))
            if probes_path:
                probes_path.write_text(json.dumps(probes, indent=1))
            specs = link_specs(probes, args.links, args.find_links if args.find_best else (),
                               recalibrate=not args.reuse_calibration)
            for link, spec in specs.items():
                print(f"link {link}: " + ", ".join(f"{k} {v:.3g}" for k, v in fit_summary(spec).items()
                                                   if v is not None), flush=True)
        if args.find_best:
            print(find_best_report(workloads, specs, args.dtype, args.top, args.find_max_seconds, args.scale))
            return 0
        workload_file = scratch / "workloads.json"
        workload_file.write_text(json.dumps(workload_file_payload(workloads)))
        for link in args.links:
            for layout in args.layouts:
                runs.append(run_row(layout, link, model_dir, workload_file, scratch, args.dtype, args.timeout))
    if specs:
        try:
            predicted = predicted_ratios(model_dir, workloads, {k: specs[k] for k in args.links if k in specs},
                                         args.dtype)
        except ValueError as err:   # the measured table stands without the prediction
            print(f"no planner prediction: {err}", flush=True)
    text, rows = table(runs, predicted)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": {"model": args.model, "dtype": args.dtype, "scale": args.scale,
                                                   "hosts": 2, "ranks_per_host": 1, "links": args.links},
                                          "probes": probes, "fits": {k: fit_summary(v) for k, v in specs.items()},
                                          "rows": rows, "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0 if all("failed" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
