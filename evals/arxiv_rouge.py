"""ROUGE-1/2/L of generation output folders against a reference column carried into the rows.

    python evals/arxiv_rouge.py outputs/arxiv                                 # completion vs abstract
    python evals/arxiv_rouge.py outputs/arxiv-t0.0 outputs/arxiv-t0.7 --json sweep.json
    python evals/arxiv_rouge.py outputs/arxiv --wandb-run-id RUN_ID           # add to the job's wandb run
    python evals/arxiv_rouge.py outputs/arxiv --wandb-project arxiv-evals     # or to a new run

Scores are F-measures (with precision and recall in the JSON) from the `rouge-score` package, Porter
stemming on, averaged over rows. Each folder gets `rouge.json`; the table lists the folders' sampling settings.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "seed")


def score_pairs(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict:
    """Mean precision / recall / F-measure of each ROUGE type over the pairs, and the per-pair F-measures."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    per_row = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]  # score(target, prediction)
    n = max(len(per_row), 1)
    mean = lambda t, part: sum(getattr(s[t], part) for s in per_row) / n  # noqa: E731
    means = {t: {part: mean(t, part) for part in ("precision", "recall", "fmeasure")} for t in ROUGE_TYPES}
    per_row_f = [{t: s[t].fmeasure for t in ROUGE_TYPES} for s in per_row]
    return {"rows": len(per_row), "mean": means, "per_row_f": per_row_f}


def read_folder(directory: str, prediction: str, reference: str) -> tuple[list[dict], dict]:
    """(rows sorted by row_index, the folder's manifest) of a job output folder."""
    import pyarrow.parquet as pq
    shards = sorted(glob.glob(os.path.join(directory, "part-*.parquet")))
    if not shards:
        raise SystemExit(f"arxiv_rouge.py: error: {directory} has no part-*.parquet shards")
    rows = [r for path in shards for r in pq.read_table(path).to_pylist()]
    for column in (prediction, reference):
        if column not in rows[0]:
            raise SystemExit(f"arxiv_rouge.py: error: {directory} rows have no column {column!r} "
                             f"(columns: {', '.join(rows[0])}); carry it with data.columns.carry")
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(manifest_path, encoding="utf-8")) if os.path.exists(manifest_path) else {}
    return sorted(rows, key=lambda r: r.get("row_index", 0)), manifest


def evaluate(directory: str, prediction: str = "completion", reference: str = "abstract") -> dict:
    rows, manifest = read_folder(directory, prediction, reference)
    scores = score_pairs([r[prediction] or "" for r in rows], [str(r[reference] or "") for r in rows])
    sampling = (manifest.get("recipe") or {}).get("sampling", {})
    return {"dir": os.path.abspath(directory), "prediction_column": prediction, "reference_column": reference,
            "sampling": {k: sampling.get(k) for k in SAMPLING_KEYS}, "model": (manifest.get("recipe") or {}).get(
                "model", {}).get("name"), "rows": scores["rows"], "rouge": scores["mean"],
            "per_row": [{"id": r["id"], **f} for r, f in zip(rows, scores["per_row_f"])]}


def format_table(results: Sequence[dict]) -> str:
    head = ["folder", "rows", "temperature", "top_p", *ROUGE_TYPES]
    body = [[os.path.basename(r["dir"]), str(r["rows"]), str(r["sampling"]["temperature"]), str(r["sampling"]["top_p"]),
             *(f"{100 * r['rouge'][t]['fmeasure']:.2f}" for t in ROUGE_TYPES)] for r in results]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in body])


def log_to_wandb(results: Sequence[dict], run_id: str | None, project: str | None, mode: str | None) -> str:
    """Put the scores into wandb run `run_id` (resumed) or a new run of `project`; returns the run id."""
    import wandb
    from seesaw_ds.jobs.tracking import resolve_mode
    recipe = json.load(open(os.path.join(results[0]["dir"], "manifest.json"))).get("recipe", {}) \
        if os.path.exists(os.path.join(results[0]["dir"], "manifest.json")) else {}
    tracking = (recipe.get("tracking") or {}).get("wandb") or {}
    project = project or tracking.get("project") or "seesaw-evals"
    mode = resolve_mode(mode or tracking.get("mode") or "online")
    kwargs = dict(id=run_id, resume="allow") if run_id else dict(job_type="eval")
    run = wandb.init(project=project, mode=mode, **kwargs)
    summary, table = {}, wandb.Table(columns=["folder", "rows", *SAMPLING_KEYS, *ROUGE_TYPES])
    for r in results:
        prefix = "eval/" if len(results) == 1 else f"eval/{os.path.basename(r['dir'])}/"
        summary |= {f"{prefix}{t}": r["rouge"][t]["fmeasure"] for t in ROUGE_TYPES} | {f"{prefix}rows": r["rows"]}
        table.add_data(os.path.basename(r["dir"]), r["rows"], *(r["sampling"][k] for k in SAMPLING_KEYS),
                       *(r["rouge"][t]["fmeasure"] for t in ROUGE_TYPES))
    run.log(summary | {"eval/rouge": table})
    run.summary.update(summary)
    run_id = run.id
    run.finish()
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="job output folders (output.dir of generate.py)")
    parser.add_argument("--reference-column", default="abstract", help="column with the reference (default abstract)")
    parser.add_argument("--prediction-column", default="completion", help="column with the output (default completion)")
    parser.add_argument("--json", default=None, help="also write all folders' scores to this file")
    parser.add_argument("--wandb-run-id", default=None, help="resume this wandb run and log the scores to it")
    parser.add_argument("--wandb-project", default=None, help="wandb project (default: the recipe's)")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline"], help="default: the recipe's")
    args = parser.parse_args(argv)
    results = []
    for directory in args.dirs:
        result = evaluate(directory, args.prediction_column, args.reference_column)
        with open(os.path.join(directory, "rouge.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        results.append(result)
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{k: v for k, v in r.items() if k != "per_row"} for r in results], handle, indent=2)
    if args.wandb_run_id or args.wandb_project:
        run_id = log_to_wandb(results, args.wandb_run_id, args.wandb_project, args.wandb_mode)
        print(f"wandb: scores logged to run {run_id}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
