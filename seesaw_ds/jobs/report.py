"""The end-of-job report: per-replica summaries and engine stats -> one total, a printed table, a JSON file.

    total = combine(replica_reports)          # replica_reports: [{"summary": {...}, "engine": {...}}, ...]
    print(format_report(total))
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from seesaw_ds.jobs.outputs import atomic_write

SUMMARY_NAME = "job_summary.json"
_ADDED = ("rows_written", "already_done", "truncated", "prompt_tokens", "completion_tokens", "shards_written")


def combine(replicas: Sequence[Mapping[str, Any]], layouts: str, world_size: int) -> dict[str, Any]:
    """Totals over the replicas' writers: counts add up, wall time is the slowest replica's."""
    summaries = [r["summary"] for r in replicas]
    total: dict[str, Any] = {k: sum(s[k] for s in summaries) for k in _ADDED}
    skipped: dict[str, int] = {}
    for s in summaries:
        for key, value in s.items():
            if key.startswith("skipped/"):
                skipped[key] = skipped.get(key, 0) + value
    wall = max((s["wall_seconds"] for s in summaries), default=0.0)
    rate = (lambda n: n / wall if wall > 0 else 0.0)  # noqa: E731
    samples = max((s.get("samples_per_row", 1) for s in summaries), default=1)   # sampling.n: rows per request
    total |= skipped | {"wall_seconds": wall, "requests_per_s": rate(total["rows_written"] / samples),
                        "samples_per_row": samples,
                        "tokens_per_s": rate(total["prompt_tokens"] + total["completion_tokens"]),
                        "output_tokens_per_s": rate(total["completion_tokens"]),
                        "num_replicas": len(replicas), "world_size": world_size, "layouts": layouts}
    return {"total": total, "replicas": [dict(r) for r in replicas]}


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def engine_line(engine: Mapping[str, Any]) -> str:
    parts = [f"switches {engine.get('num_switches', 0)}",
             f"prefill {engine.get('prefill_s', 0.0):.1f} s / {engine.get('prefill_tokens', 0)} tok",
             f"decode {engine.get('decode_s', 0.0):.1f} s / {engine.get('decode_tokens', 0)} tok"]
    if "switch_s" in engine:
        parts.append(f"switching {engine['switch_s']:.2f} s")
    if "kv_bytes_moved" in engine:
        parts.append(f"KV moved {_megabytes(engine['kv_bytes_moved'])} (onboard {engine.get('onboard_s', 0.0):.2f} s)")
    parts.append(f"mean decode batch {engine.get('mean_decode_batch', 0.0):.1f}")
    return ", ".join(parts)


def format_report(report: Mapping[str, Any]) -> str:
    t = report["total"]
    skipped = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("skipped/")}
    plural = lambda n, noun: f"{n} {noun}" + ("" if n == 1 else "s")  # noqa: E731
    lines = [("layouts", f"{t['layouts']} ({plural(t['world_size'], 'rank')}, "
                         f"{plural(t['num_replicas'], 'replica')})"),
             ("rows written", f"{t['rows_written']}" + (f" ({t['rows_written'] // t['samples_per_row']} inputs x "
                                                         f"{t['samples_per_row']} samples)"
                                                         if t.get("samples_per_row", 1) > 1 else "")),
             ("rows done earlier", f"{t['already_done']}"),
             ("rows skipped", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "0"),
             ("truncated prompts", f"{t['truncated']}"),
             ("prompt / output tokens", f"{t['prompt_tokens']} / {t['completion_tokens']}"),
             ("wall time", f"{t['wall_seconds']:.1f} s"), ("requests/s", f"{t['requests_per_s']:.2f}"),
             ("tokens/s (prompt+output)", f"{t['tokens_per_s']:.1f}"),
             ("output tokens/s", f"{t['output_tokens_per_s']:.1f}")]
    for i, replica in enumerate(report["replicas"]):
        lines.append((f"engine, replica {i}", engine_line(replica.get("engine", {}))))
    width = max(len(k) for k, _ in lines)
    return "\n".join(["job summary"] + [f"  {k:<{width}}  {v}" for k, v in lines])


def write_report(directory: str, report: Mapping[str, Any]) -> str:
    """`job_summary.json` of the last run into the output folder (atomically; shards are untouched)."""
    text = json.dumps(report, indent=2, default=str).encode()
    return atomic_write(directory, SUMMARY_NAME, lambda handle: handle.write(text))
