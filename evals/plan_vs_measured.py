"""The planner's predictions next to what `evals/throughput.py` measured, for the 2-rank layouts.

    python evals/throughput.py --seesaw-layouts 1proc,TP2,PP2,PP2->TP2 --out evals/results/throughput.json
    python evals/plan_vs_measured.py --results evals/results/throughput.json

For each workload of the result file, the planner (calibrated `2xlocal` cluster, the workload's mean
lengths and request count) predicts static TP2, static PP2 and PP2 -> TP2. Throughput ratios are compared,
not absolute rates: both are taken relative to PP2 -> TP2, so a constant error in the calibrated peaks
cancels. A gap over 25% is flagged. Writes JSON beside the results (`*.plan.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# measured row label -> planner candidate label (TP x PP x DP per stage)
LAYOUTS = {
    "TP2": "TP2xPP1xDP1",
    "PP2": "TP1xPP2xDP1",
    "PP2->TP2": "TP1xPP2xDP1 -> TP2xPP1xDP1",
}
REFERENCE = "PP2->TP2"
GAP_FLAG = 0.25


def measured_rates(results: dict) -> dict[str, dict[str, dict]]:
    """{workload: {layout: {tokens_per_s, prefill_s, decode_s}}} for the seesaw rows."""
    out: dict[str, dict[str, dict]] = {}
    for row in results["rows"]:
        if row["engine"] == "seesaw" and row["layout"] in LAYOUTS:
            extra = row.get("extra") or {}
            out.setdefault(row["workload"], {})[row["layout"]] = {
                "tokens_per_s": row["tokens_per_s"], "prefill_s": extra.get("prefill_s"),
                "decode_s": extra.get("decode_s")}
    return out


def model_folder(meta: dict) -> str:
    """The run's converted model folder, or (on another machine) the same folder made again from its spec."""
    if Path(meta["model_dir"]).is_dir():
        return meta["model_dir"]
    from seesaw_ds.models.loader import resolve_model_folder
    return resolve_model_folder(meta["model"])


def predicted_rates(model_dir: str, workload_info: dict, dtype: str, recalibrate: bool) -> dict[str, dict]:
    from seesaw_ds.planner import PlannerOptions, plan
    from seesaw_ds.planner.search import stage_totals
    from seesaw_ds.planner.workload import WorkloadSpec
    n = workload_info["requests"]
    spec = WorkloadSpec("measured", workload_info["prompt_tokens"] / n, workload_info["output_tokens"] / n, n)
    result = plan(model_dir, "2xlocal", spec, PlannerOptions(dtype=dtype), recalibrate=recalibrate)
    by_label = {c.label: c for c in result.ranked}
    out = {}
    for layout, label in LAYOUTS.items():
        c = by_label.get(label)
        if c is not None:
            prefill, decode = stage_totals(c.prefill, c.decode, c.workload)
            out[layout] = {"tokens_per_s": c.tokens_per_s, "prefill_s": prefill.total, "decode_s": decode.total,
                           "seconds": c.time.as_dict(), "num_switches": c.num_switches}
    return out


def _ratio(table: dict, layout: str, key: str) -> float | None:
    value, ref = table[layout].get(key), table[REFERENCE].get(key)
    return value / ref if value and ref else None


def compare(measured: dict[str, dict], predicted: dict[str, dict]) -> list[dict]:
    """Per layout: throughput ratio to the reference, measured and predicted, and each stage's time ratio
    (>1: the stage takes longer than under the reference)."""
    rows = []
    if REFERENCE not in measured or REFERENCE not in predicted:
        return rows
    for layout in LAYOUTS:
        if layout not in measured or layout not in predicted:
            continue
        m, p = _ratio(measured, layout, "tokens_per_s"), _ratio(predicted, layout, "tokens_per_s")
        rows.append({"layout": layout, "measured_tokens_per_s": measured[layout]["tokens_per_s"],
                     "predicted_tokens_per_s": predicted[layout]["tokens_per_s"],
                     "measured_ratio": m, "predicted_ratio": p, "gap": p / m - 1,
                     **{f"{kind}_{stage}_x": _ratio(table, layout, f"{stage}_s")
                        for kind, table in (("measured", measured), ("predicted", predicted))
                        for stage in ("prefill", "decode")},
                     "predicted_seconds": predicted[layout]["seconds"]})
    return rows


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_rows(workload: str, rows: list[dict]) -> str:
    lines = [f"{workload}: ratios to {REFERENCE} (stage columns: time, measured / predicted)",
             f"  {'layout':<10} {'measured tok/s':>14} {'predicted tok/s':>15} {'measured x':>10} "
             f"{'predicted x':>11} {'gap':>7}  {'prefill time x':>14}  {'decode time x':>13}"]
    for r in rows:
        flag = "  <-- over 25%" if abs(r["gap"]) > GAP_FLAG else ""
        stages = "  ".join(f"{_x(r[f'measured_{st}_x']):>6} / {_x(r[f'predicted_{st}_x']):<5}"
                           for st in ("prefill", "decode"))
        lines.append(f"  {r['layout']:<10} {r['measured_tokens_per_s']:>14.0f} {r['predicted_tokens_per_s']:>15.0f} "
                     f"{r['measured_ratio']:>10.2f} {r['predicted_ratio']:>11.2f} {100 * r['gap']:>6.0f}%  "
                     f"{stages}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="evals/results/throughput.json", help="evals/throughput.py JSON")
    p.add_argument("--recalibrate", action="store_true", help="re-measure the local cluster first")
    args = p.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    measured = measured_rates(results)
    if not measured:
        print(f"no seesaw rows for {', '.join(LAYOUTS)} in {args.results}: run evals/throughput.py with "
              f"--seesaw-layouts {','.join(LAYOUTS)}", file=sys.stderr)
        return 2
    model_dir = model_folder(results["meta"])
    report = {}
    for workload, rates in sorted(measured.items()):
        predicted = predicted_rates(model_dir, results["workloads"][workload],
                                    results["meta"]["dtype"], args.recalibrate and not report)
        rows = compare(rates, predicted)
        report[workload] = rows
        print(format_rows(workload, rows))
    out = Path(args.results).with_suffix(".plan.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
