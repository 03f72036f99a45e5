"""A recipe's engine settings swept through the real job: `launch/generate.py` per grid point, side by side.

Each grid point is one `deepspeed --num_gpus N launch/generate.py --config RECIPE key=value ...` into a fresh
output folder (nothing resumed), so a point's tokens/s is what `make generate` reports with those settings.
Rounds interleave the points (round 2 runs them in reverse order), so a drift of the machine meets every
point alike; the table shows each round, the median, and the ratio to the recipe's own setting.

    python evals/recipe_sweep.py --config recipes/arxiv.yaml --grid engine.max_num_batched_tokens=2048,4096,8192,16384
    python evals/recipe_sweep.py --config recipes/sharegpt.yaml --set data.limit=128 \\
        --grid "engine.max_num_batched_tokens=4096,8192,16384;engine.max_num_seqs=32,64,128"
    python evals/recipe_sweep.py --config recipes/arxiv.yaml --num-gpus 1,2     # `make generate` vs NUM_GPUS=2

Writes `--out` (JSON: every run's job summary totals and engine stage times, and the table's rows).
"""
from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals.cli import OneLineParser  # noqa: E402

RESULTS = ROOT / "evals" / "results"


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """'a=1,2;b=x,y' -> [("a", ["1", "2"]), ("b", ["x", "y"])]."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"grid axis {part!r} is not key=v1,v2,...")
        axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    if not axes:
        raise ValueError("the grid is empty")
    return axes


def grid_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


RANKS = "ranks"      # a grid point's DeepSpeed --num_gpus (not a recipe key)


def label(point: dict[str, str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


def run_point(config: str, point: dict[str, str], extra: list[str], out_dir: Path, timeout: float) -> dict:
    """One job; its job_summary.json totals and replica 0's engine stats (or the failure's last line)."""
    from seesaw_ds.distributed.node import free_port
    cmd = ["deepspeed", "--num_gpus", point[RANKS], "--master_port", str(free_port()),
           str(ROOT / "launch" / "generate.py"), "--config", config, *extra,
           *(f"{k}={v}" for k, v in point.items() if k != RANKS), f"output.dir={out_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    summary = out_dir / "job_summary.json"
    if proc.returncode != 0 or not summary.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"point": point, "ok": False, "error": tail[0], "process_s": time.perf_counter() - start}
    report = json.loads(summary.read_text())
    engine = report["replicas"][0].get("engine", {})
    keep = ("prefill_s", "decode_s", "switch_s", "num_switches", "mean_decode_batch", "prefill_steps", "decode_steps")
    return {"point": point, "ok": True, "tokens_per_s": report["total"]["tokens_per_s"],
            "total": report["total"], "engine": {k: engine[k] for k in keep if k in engine},
            "process_s": time.perf_counter() - start}


def table(points: list[dict[str, str]], runs: list[dict], reference: dict[str, str] | None) -> tuple[str, list[dict]]:
    rounds = max((r["round"] for r in runs), default=0) + 1
    rows = []
    for point in points:
        mine = sorted((r for r in runs if r["point"] == point), key=lambda r: r["round"])
        rates = [r["tokens_per_s"] for r in mine if r["ok"]]
        stages = [r["engine"] for r in mine if r["ok"]]
        rows.append({"point": point, "rates": rates, "median": statistics.median(rates) if rates else None,
                     "prefill_s": statistics.median(s.get("prefill_s", 0.0) for s in stages) if stages else None,
                     "decode_s": statistics.median(s.get("decode_s", 0.0) for s in stages) if stages else None,
                     "errors": [r["error"] for r in mine if not r["ok"]]})
    base = next((r["median"] for r in rows if r["point"] == reference), None)
    width = max(len(label(p)) for p in points)
    head = f"{'setting':<{width}}  " + "".join(f"{f'round {i + 1}':>10}" for i in range(rounds)) + \
        f"{'median':>10}{'x recipe':>10}{'prefill s':>11}{'decode s':>10}"
    lines = [head]
    for row in rows:
        cells = "".join(f"{r:10.1f}" for r in row["rates"]) + " " * 10 * (rounds - len(row["rates"]))
        ratio = f"{row['median'] / base:10.2f}" if base and row["median"] else f"{'-':>10}"
        row["x_recipe"] = row["median"] / base if base and row["median"] else None
        median = f"{row['median']:10.1f}" if row["median"] else f"{'failed':>10}"
        stage = f"{row['prefill_s']:11.1f}{row['decode_s']:10.1f}" if row["prefill_s"] is not None else ""
        mark = "  <- recipe" if row["point"] == reference else ""
        lines.append(f"{label(row['point']):<{width}}  {cells}{median}{ratio}{stage}{mark}")
        lines += [f"    error: {e}" for e in row["errors"]]
    return "\n".join(lines), rows


def recipe_setting(config: str, extra: list[str], keys: list[str]) -> dict[str, str] | None:
    """The grid point that equals what the recipe (with `--set` overrides) runs, where the grid holds it."""
    from seesaw_ds.jobs.recipe import load_recipe
    recipe = load_recipe(config, extra)
    values = {}
    for key in keys:
        node = recipe
        for part in key.split("."):
            node = getattr(node, part, None)
        if node is None:
            return None
        values[key] = str(node)
    return values


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the recipe (YAML)")
    p.add_argument("--grid", default="", help="'key=v1,v2;key2=w1,w2' (recipe keys, as on the command line)")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every point (key=value)")
    p.add_argument("--num-gpus", default="1",
                   help="ranks per job (DeepSpeed's --num_gpus); a comma list is a grid axis")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        axes = parse_grid(args.grid) if args.grid else []
        ranks = [str(int(n)) for n in args.num_gpus.split(",")]
    except ValueError as e:
        p.error(f"--grid / --num-gpus: {e}")
    if args.rounds < 1 or any(int(n) < 1 for n in ranks) or (not axes and len(ranks) < 2):
        p.error("--rounds and --num-gpus must be >= 1, and --grid or several --num-gpus values give the points")
    points = grid_points([(RANKS, ranks), *axes])
    reference = recipe_setting(args.config, args.set, [k for k, _ in axes])
    reference = None if reference is None else {RANKS: ranks[0], **reference}
    runs = []
    with tempfile.TemporaryDirectory(prefix="recipe_sweep_") as scratch:
        for rnd in range(args.rounds):
            order = points if rnd % 2 == 0 else points[::-1]
            for i, point in enumerate(order):
                out_dir = Path(scratch) / f"r{rnd}-{i}"
                print(f"== round {rnd + 1}: {label(point)}", flush=True)
                run = run_point(args.config, point, args.set, out_dir, args.timeout)
                runs.append({**run, "round": rnd})
                status = f"{run['tokens_per_s']:.1f} tokens/s" if run["ok"] else f"failed: {run['error']}"
                print(f"   {status}", flush=True)
    text, rows = table(points, runs, reference)
    print(text)
    out = Path(args.out) if args.out else RESULTS / f"recipe_sweep-{Path(args.config).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.config, "grid": args.grid, "set": args.set, "num_gpus": args.num_gpus,
            "rounds": args.rounds, "recipe_setting": reference}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
