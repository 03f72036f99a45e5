"""Decode's linear layers alone, streamed from memory: the tile-unit kernel against oneDNN's packed matmul.

A decode step reads every layer's weights once. This times a whole model's worth of decode linears (per
layer: q/k/v as one matmul, o, gate/up as one, down; SmolLM2-135M's shapes by default), each layer's own
random bf16 weights, so they come from memory as in a real step and not from a cache that a loop over one
weight would keep warm. Rounds alternate the two kernels; the table gives the best round of each, the rate at
which the weights were read and the matmul rate reached.

    python evals/linear_stream.py                              # rows 1 .. 128, 2 threads
    python evals/linear_stream.py --rows 1,22,47 --threads 1

Prints a table and writes JSON to evals/results/linear_stream.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.cli import OneLineParser  # noqa: E402
from seesaw_ds.kv.native import linear_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def arguments(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9, help="query heads (head dim = hidden / heads)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", default="1,4,8,16,22,32,47,64,96,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="passes over all layers per round")
    p.add_argument("--out", default=str(RESULTS / "linear_stream.json"))
    args = p.parse_args(argv)
    try:
        args.rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows: expected comma-separated integers, got {args.rows!r}")
    return args


def layer_shapes(args) -> list[tuple[int, int]]:
    """(N, K) of one layer's four matmuls: q/k/v, o, gate/up, down."""
    d = args.hidden // args.heads
    qkv = (args.heads + 2 * args.kv_heads) * d
    return [(qkv, args.hidden), (args.hidden, args.hidden), (2 * args.intermediate, args.hidden),
            (args.hidden, args.intermediate)]


def main(argv=None) -> int:
    args = arguments(argv)
    native = linear_ops()
    if native is None:
        print("error: the tile-unit linear is not available here (no AMX, or SEESAW_DS_NATIVE=0)", file=sys.stderr)
        return 2
    pack, linear = native
    torch.set_num_threads(args.threads)
    shapes = layer_shapes(args)
    weights = [[torch.randn(n, k).bfloat16() for n, k in shapes] for _ in range(args.layers)]
    nbytes = sum(w.numel() * w.element_size() for layer in weights for w in layer)
    kernels = {
        "oneDNN": [[(torch.ops.mkldnn._reorder_linear_weight(w, None), n) for w, (n, _) in zip(layer, shapes)]
                   for layer in weights],
        "tile unit": [[(pack(w), n) for w, (n, _) in zip(layer, shapes)] for layer in weights],
    }
    calls = {"oneDNN": lambda x, p, n: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
             "tile unit": lambda x, p, n: linear(x, p, None, n)}
    del weights
    rows_out = []
    print(f"{args.layers} layers x {len(shapes)} matmuls, {nbytes / 1e6:.0f} MB of bf16 weights, "
          f"{args.threads} thread(s); best of {args.rounds} rounds")
    print(f"{'rows':>5}  {'oneDNN ms':>9}  {'GB/s':>5}  {'tile ms':>8}  {'GB/s':>5}  {'GFLOP/s':>7}  {'speed-up':>8}")
    for m in args.rows:
        xs = {k: torch.randn(m, k).bfloat16() for _, k in shapes}
        best = {name: float("inf") for name in kernels}

        def one_pass(name):
            for layer in kernels[name]:
                for (packed, n), (_, k) in zip(layer, shapes):
                    calls[name](xs[k], packed, n)
        for name in kernels:
            one_pass(name)                                    # warm: first-touch, oneDNN's primitive cache
        for _ in range(args.rounds):
            for name in kernels:
                start = time.perf_counter()
                for _ in range(args.reps):
                    one_pass(name)
                best[name] = min(best[name], (time.perf_counter() - start) / args.reps * 1e3)
        a, b = best["oneDNN"], best["tile unit"]
        flops = 2 * m * nbytes / 2
        rows_out.append({"rows": m, "onednn_ms": a, "tile_ms": b, "onednn_gbs": nbytes / a / 1e6,
                         "tile_gbs": nbytes / b / 1e6, "tile_gflops": flops / b / 1e6, "speedup": a / b})
        print(f"{m:>5}  {a:>9.2f}  {nbytes / a / 1e6:>5.1f}  {b:>8.2f}  {nbytes / b / 1e6:>5.1f}  "
              f"{flops / b / 1e6:>7.0f}  {a / b:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "weight_bytes": nbytes,
                               "rows": rows_out}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
