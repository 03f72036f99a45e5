"""Turn engine result files into rows with rates and ratios, a text table and a bar chart.

tokens/s counts prompt + output tokens over the wall time of the timed `generate`; output tokens/s counts
the requested output tokens only. Ratios compare with the `hf` row and with the best `vllm` row of the same
workload (the best static vLLM layout, as the Seesaw paper compares).

Rows of a baseline revision (`--baseline REV`) carry the layout label `LAYOUT@<short rev>`; `baseline_pairs`
puts each beside the current row of the same engine, layout and workload: the throughput ratio current /
baseline and how many requests generated identical tokens (from the runners' per-request output digests).
"""
from __future__ import annotations

from pathlib import Path


def result_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        for res in run.get("results", []):
            wall = res["wall_s"]
            rows.append({
                "engine": run["engine"], "layout": run.get("layout", "1proc"), "dtype": run["dtype"],
                "workload": res["workload"], "requests": res["requests"],
                "prompt_tokens": res["prompt_tokens"], "output_tokens": res["output_tokens"],
                "tokens": res["prompt_tokens"] + res["output_tokens"], "wall_s": wall,
                "tokens_per_s": (res["prompt_tokens"] + res["output_tokens"]) / wall,
                "output_tokens_per_s": res["output_tokens"] / wall,
                "exact_lengths": res["generated_tokens"] == res["output_tokens"] and not res["short_requests"],
                "setup_s": run.get("setup_s"), "extra": res.get("extra", {}),
                "output_digests": res.get("output_digests"),
            })
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        same = [r for r in rows if r["workload"] == row["workload"]]
        hf = [r["tokens_per_s"] for r in same if r["engine"] == "hf"]
        vllm = [r["tokens_per_s"] for r in same if r["engine"] == "vllm"]
        row["vs_hf"] = row["tokens_per_s"] / max(hf) if hf else None
        row["vs_vllm"] = row["tokens_per_s"] / max(vllm) if vllm else None


def format_table(rows: list[dict]) -> str:
    header = ("workload", "engine", "layout", "dtype", "req", "tokens", "wall s", "tok/s", "out tok/s",
              "x hf", "x vllm", "exact")
    lines = [header]
    for r in sorted(rows, key=lambda r: (r["workload"], r["engine"], r["layout"])):
        lines.append((r["workload"], r["engine"], r["layout"], r["dtype"], str(r["requests"]), str(r["tokens"]),
                      f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['output_tokens_per_s']:.0f}",
                      "-" if r["vs_hf"] is None else f"{r['vs_hf']:.2f}",
                      "-" if r["vs_vllm"] is None else f"{r['vs_vllm']:.2f}",
                      "yes" if r["exact_lengths"] else "NO"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i >= 4 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def baseline_pairs(rows: list[dict]) -> list[dict]:
    """One record per baseline row (layout 'X@rev') that has a current row 'X' of the same engine and workload:
    both rates, `ratio` = current / baseline tokens/s, and `same_tokens` = requests whose output tokens are
    identical in both (None when a row has no digests)."""
    current = {(r["engine"], r["layout"], r["workload"]): r for r in rows if "@" not in r["layout"]}
    pairs = []
    for base in rows:
        layout, _, rev = base["layout"].partition("@")
        now = current.get((base["engine"], layout, base["workload"]))
        if not rev or now is None:
            continue
        a, b = base.get("output_digests"), now.get("output_digests")
        same = sum(x == y for x, y in zip(a, b)) if a and b and len(a) == len(b) else None
        pairs.append({"workload": base["workload"], "engine": base["engine"], "layout": layout, "baseline": rev,
                      "baseline_tokens_per_s": base["tokens_per_s"], "tokens_per_s": now["tokens_per_s"],
                      "ratio": now["tokens_per_s"] / base["tokens_per_s"], "requests": now["requests"],
                      "same_tokens": same})
    return sorted(pairs, key=lambda p: (p["workload"], p["engine"], p["layout"]))


def format_baseline_table(pairs: list[dict]) -> str:
    """'current / baseline' per layout and workload, with the token-identity count ('NO' marks a difference)."""
    header = ("workload", "layout", "baseline", "base tok/s", "tok/s", "cur/base", "same tokens")
    lines = [header]
    for p in pairs:
        same = "-" if p["same_tokens"] is None else \
            f"{p['same_tokens']}/{p['requests']}" + ("" if p["same_tokens"] == p["requests"] else " NO")
        lines.append((p["workload"], p["layout"], p["baseline"], f"{p['baseline_tokens_per_s']:.0f}",
                      f"{p['tokens_per_s']:.0f}", f"{p['ratio']:.3f}", same))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


STAGE_HEADER = ("workload", "layout", "switches", "prefill s", "decode s", "switch s", "stall % dec",
                "mean batch")


def format_stage_table(rows: list[dict]) -> str:
    """Where the seesaw rows spent their time (from the engine's counters over the timed run)."""
    lines = [STAGE_HEADER]
    for r in sorted(rows, key=lambda r: (r["workload"], r["layout"])):
        x = r.get("extra") or {}
        if r["engine"] != "seesaw" or "decode_s" not in x:
            continue
        steps = x.get("decode_steps") or 0
        decode = x.get("decode_s") or 0.0
        lines.append((r["workload"], r["layout"], str(x.get("num_switches", 0)), f"{x.get('prefill_s', 0.0):.1f}",
                      f"{decode:.1f}", f"{x.get('switch_s', 0.0):.2f}",
                      f"{100 * x.get('prefetch_stall_s', 0.0) / decode:.1f}" if decode else "-",
                      f"{x.get('decode_tokens', 0) / steps:.1f}" if steps else "-"))
    if len(lines) == 1:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(STAGE_HEADER))]
    return "\n".join("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def plot_rows(rows: list[dict], png: Path) -> bool:
    """Grouped bars of tokens/s per workload and engine row; False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = sorted({r["workload"] for r in rows})
    labels = sorted({f"{r['engine']} {r['layout']} {r['dtype']}" for r in rows})
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.4 * len(workloads)), 4.6))
    for i, label in enumerate(labels):
        heights = [next((r["tokens_per_s"] for r in rows if r["workload"] == wl
                         and f"{r['engine']} {r['layout']} {r['dtype']}" == label), 0.0) for wl in workloads]
        xs = [w + (i - (len(labels) - 1) / 2) * width for w in range(len(workloads))]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("prompt + output tokens / s")
    ax.set_title("Offline throughput: same requests for every engine, greedy, EOS ignored", fontsize=10)
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(labels)), frameon=False)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True
