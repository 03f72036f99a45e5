"""Side-by-side offline throughput: seesaw_ds, Hugging Face generate and (optionally) vLLM on the same requests.

Every engine gets the same token ids (evals/workloads.py), decodes greedily with EOS ignored so each request
generates exactly its target length, and is timed over one `generate` call after a short warm-up. Engines run
one at a time, each in its own subprocess (clean memory and threads); vLLM runs from its own virtualenv.

    python evals/throughput.py                                   # seesaw + hf, all workloads, bf16
    python evals/throughput.py --scale 0.25 --workloads arxiv,sharegpt
    python evals/throughput.py --engines hf --peers vllm --vllm-layouts TP1,PP2 --dtype float32
    python evals/throughput.py --engines seesaw --seesaw-layouts 1proc,PP2->TP2 --baseline HEAD~1

Seesaw rows are layout labels in the engine's own grammar (seesaw_ds.parallel.layout: 1proc, TP2, PP2,
PP2->TP2, PP2xTP2, ...); a label that needs N > 1 ranks runs under `deepspeed --num_gpus N`.
`--baseline REV` also runs every seesaw row on REV's seesaw_ds (a temporary git worktree, see evals/baseline.py),
just before the current row of the same layout so both meet the same machine state; the rows are labelled
`LAYOUT@<short rev>`, and a second table gives current / baseline and whether the output tokens are identical.

Writes `--out` (JSON: meta, workloads, raw runs, rows with tokens/s and ratios, baseline pairs) and a PNG bar
chart beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evals.baseline import BaselineTree, baseline_worktree, resolve_commit  # noqa: E402
from evals.throughput_report import (baseline_pairs, format_baseline_table, format_stage_table,  # noqa: E402
                                     format_table, plot_rows, result_rows)
from evals.workloads import WORKLOADS, build_workloads, parse_workload_names, workload_file_payload  # noqa: E402
from seesaw_ds.data import total_tokens  # noqa: E402
from seesaw_ds.parallel.layout import StageLayouts  # noqa: E402

PEERS = REPO / "evals" / "peers"


@dataclasses.dataclass(frozen=True)
class SeesawLayout:
    label: str
    launcher: tuple[str, ...]   # command prefix that starts the runner script
    llm_kwargs: dict            # extra keyword arguments for seesaw_ds.LLM
    ranks: int = 1
    replicas: bool = False      # one one-rank engine per rank (data parallel), not one engine over the ranks

    def __post_init__(self):
        if not self.label or not self.launcher:
            raise ValueError(f"SeesawLayout needs a label and a launcher, got {self.label!r}, {self.launcher!r}")


def seesaw_layout(text: str) -> SeesawLayout:
    """A seesaw row from a layout label (any form `seesaw_ds.parallel.layout.parse_layout_spec` reads):
    its canonical label, the launcher for the ranks it needs, and `LLM(parallel=...)`. ValueError if bad.

    `parallel` is the layout as the plain mapping every revision's LLM reads ({tp, pp} or {prefill, decode}),
    without `dp`: a row is one replica over the ranks it launches, which the engine fills in itself."""
    layouts = StageLayouts.from_spec(text)
    if layouts.prefill.dp > 1 and layouts.prefill.ranks_per_replica > 1:
        raise ValueError(f"seesaw layout {text!r}: DP rows are one-rank replicas (TP1xDP2); a replica of several "
                         f"ranks is not a row")
    ranks = layouts.world_size
    if layouts.prefill.dp > 1:      # replicas: every rank its own engine over its share of the requests
        return SeesawLayout(layouts.label(), ("deepspeed", "--num_gpus", str(ranks)), {}, ranks, replicas=True)
    if ranks == 1:
        return SeesawLayout(layouts.label(), (sys.executable,), {})
    spec = {k: v for k, v in layouts.spec().items() if k != "dp"}
    return SeesawLayout(layouts.label(), ("deepspeed", "--num_gpus", str(ranks)), {"parallel": spec}, ranks)


def seesaw_layouts(labels: str) -> list[SeesawLayout]:
    """The comma list of `--seesaw-layouts`, in order, each layout once (TP1 and 1proc are the same row)."""
    rows = {}
    for text in labels.split(","):
        if text.strip():
            row = seesaw_layout(text)
            rows.setdefault(row.label, row)
    return list(rows.values())


VLLM_LAYOUTS = {"TP1": (1, 1), "PP2": (1, 2)}   # label -> (tensor_parallel_size, pipeline_parallel_size)


@dataclasses.dataclass(frozen=True)
class EngineRun:
    engine: str
    layout: str
    command: tuple[str, ...]
    env: dict | None = None     # None: inherit


def planned_runs(args, model_dir: str, workload_file: Path, scratch: Path,
                 baseline: BaselineTree | None = None) -> list[EngineRun]:
    """The engine rows to run, in order; the result file of each is `scratch/<engine>-<layout>.json`.

    With a `baseline`, each seesaw layout runs first on the baseline's runner (label `LAYOUT@<short rev>`, its
    own SEESAW_CACHE), then on the current one: the pair meets the same machine state."""
    def common(engine: str, layout: str) -> list[str]:
        out = scratch / f"{engine}-{layout}.json".replace(">", "")
        return ["--model", model_dir, "--workloads", str(workload_file), "--out", str(out), "--dtype", args.dtype,
                "--threads", str(args.threads), "--layout", layout]

    runs = []
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for engine in engines:
        if engine == "hf":
            extra = ["--batch-size", str(args.hf_batch_size)] if args.hf_batch_size else []
            runs.append(EngineRun("hf", "1proc", (sys.executable, str(PEERS / "hf_generate.py"),
                                                  *common("hf", "1proc"), *extra)))
        elif engine == "seesaw":
            for layout in seesaw_layouts(args.seesaw_layouts):
                kwargs = dict(layout.llm_kwargs)
                if layout.ranks > 1:                   # multi-rank rows: the host tier's settings, when given
                    for key, value in (("kv_host_gb", args.kv_host_gb), ("kv_threshold", args.kv_threshold)):
                        if value is not None:
                            kwargs[key] = value
                rows = [(layout.label, PEERS / "seesaw_runner.py", None)]
                if baseline is not None:
                    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "SEESAW_CACHE": str(baseline.cache_dir)}
                    rows.insert(0, (baseline.label(layout.label), baseline.runner, env))
                for label, runner, env in rows:
                    replicas = ("--replicas",) if layout.replicas else ()
                    runs.append(EngineRun("seesaw", label, (*layout.launcher, str(runner), *common("seesaw", label),
                                                            "--llm-kwargs", json.dumps(kwargs), *replicas), env))
        else:
            raise ValueError(f"unknown engine {engine!r}; engines: hf, seesaw (peers via --peers)")
    if "vllm" in args.peers.split(","):
        from evals.peers.vllm_env import vllm_process_env, vllm_python
        python = vllm_python(install=not args.no_install)
        for label in args.vllm_layouts.split(","):
            tp, pp = VLLM_LAYOUTS[label]
            env = vllm_process_env(scratch / f"vllm-cache-{label}", tp=tp, pp=pp)
            runs.append(EngineRun("vllm", label, (str(python), str(PEERS / "vllm_runner.py"), *common("vllm", label),
                                                  "--tp", str(tp), "--pp", str(pp)), env))
    return runs


def _stop_process_group(proc: subprocess.Popen) -> None:
    """Terminate what is left of a row's process group (its leader and any worker it started)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:
                os.killpg(proc.pid, 0)  # workers may outlive the leader
            except ProcessLookupError:
                return


def execute(run: EngineRun, log_dir: Path, timeout: float) -> dict:
    """Run one engine row to completion; its result dict, or a failure record with the log's tail."""
    out = Path(run.command[run.command.index("--out") + 1])
    log = log_dir / f"{run.engine}-{run.layout}.log".replace(">", "")
    print(f"== {run.engine} {run.layout}: log {log}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        # NOTE: own session, so that stopping the row also stops the workers it spawned (vLLM's, deepspeed's).
        proc = subprocess.Popen(run.command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=run.env or {**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:
            _stop_process_group(proc)
    elapsed = time.perf_counter() - start
    if code == 0 and out.is_file():
        result = json.loads(out.read_text())
        result["process_s"] = elapsed
        if result.get("skipped"):
            print(f"   skipped: {result['skipped']}", flush=True)
        return result
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"   FAILED ({code}) after {elapsed:.0f} s; last lines:\n     " + "\n     ".join(tail), flush=True)
    return {"engine": run.engine, "layout": run.layout, "failed": str(code), "log_tail": tail, "results": []}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2", help="model spec for seesaw_ds.models.loader")
    p.add_argument("--engines", default="seesaw,hf", help="comma list of: seesaw, hf")
    p.add_argument("--peers", default="", help="comma list of peer engines in their own env: vllm")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of: {', '.join(WORKLOADS)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply request counts (e.g. 0.25 for a quick run)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX) or on an accelerator, "
                        "else float32; resolved once and given to every engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for 1-process rows")
    p.add_argument("--seesaw-layouts", default="1proc",
                   help="comma list of layout labels: 1proc, TPn, PPn, PPn->TPn, PPaxTPb, ... (n ranks each)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also run every seesaw row on this git revision (a temporary worktree), labelled "
                        "LAYOUT@<short rev>, and compare throughput and output tokens")
    p.add_argument("--vllm-layouts", default="TP1", help=f"comma list of: {', '.join(VLLM_LAYOUTS)}")
    p.add_argument("--kv-host-gb", type=float, default=None, help="host KV store per node for multi-rank rows")
    p.add_argument("--kv-threshold", type=float, default=None, help="host-store drain fraction that ends decode")
    p.add_argument("--hf-batch-size", type=int, default=None, help="fix the HF batch size (default: probe)")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing the vLLM venv")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine row")
    p.add_argument("--out", default=str(REPO / "evals" / "results" / "throughput.json"))
    args = p.parse_args(argv)
    args.workload_names = parse_workload_names(args.workloads)
    if args.dtype == "auto":
        from seesaw_ds.models.config import parse_dtype
        args.dtype = str(parse_dtype("auto")).replace("torch.", "")
    try:
        args.seesaw_rows = seesaw_layouts(args.seesaw_layouts)
    except ValueError as err:
        p.error(f"--seesaw-layouts: {err}")
    if args.baseline:
        if "seesaw" not in args.engines.split(","):
            p.error("--baseline compares seesaw rows: add seesaw to --engines")
        try:
            resolve_commit(args.baseline)
        except ValueError as err:
            p.error(str(err))
    for label in args.vllm_layouts.split(","):
        if label not in VLLM_LAYOUTS:
            p.error(f"unknown vLLM layout {label!r}; choose from {', '.join(VLLM_LAYOUTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the running row is stopped too
    from transformers import AutoConfig, AutoTokenizer
    from seesaw_ds.models.loader import resolve_model_folder
    model_dir = resolve_model_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    workloads = build_workloads(args.workload_names, tokenizer, vocab_size, args.scale, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: another job shares the cores", flush=True)

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seesaw-throughput-")))
        baseline = stack.enter_context(baseline_worktree(args.baseline)) if args.baseline else None
        if baseline is not None:
            print(f"baseline {args.baseline} = {baseline.short}: worktree {baseline.root}", flush=True)
        workload_file = scratch / "workloads.json"
        workload_file.write_text(json.dumps(workload_file_payload(workloads)))
        log_dir = out.parent / "logs"
        log_dir.mkdir(exist_ok=True)
        runs = [execute(run, log_dir, args.timeout)
                for run in planned_runs(args, model_dir, workload_file, scratch, baseline)]

    rows = result_rows(runs)
    print(format_table(rows) if rows else "no engine produced results")
    stages = format_stage_table(rows)
    if stages:
        print("\nseesaw_ds stage times (timed run)\n" + stages)
    pairs = baseline_pairs(rows)
    if pairs:
        print(f"\ncurrent / baseline ({args.baseline} = {baseline.short})\n" + format_baseline_table(pairs))
        if any(p["same_tokens"] != p["requests"] for p in pairs):
            print("warning: the output tokens differ from the baseline's (or were not recorded) in some rows")
    meta = {"model": args.model, "model_dir": model_dir, "dtype": args.dtype, "scale": args.scale, "seed": args.seed,
            "threads": args.threads, "load_average_before": load, "cpus": os.cpu_count(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "baseline": None if baseline is None else {"rev": baseline.rev, "commit": baseline.commit,
                                                       "short": baseline.short}}
    described = {name: {"description": WORKLOADS[name].description, "requests": len(reqs),
                        "prompt_tokens": total_tokens(reqs)[0], "output_tokens": total_tokens(reqs)[1]}
                 for name, reqs in workloads.items()}
    layouts = [{"engine": "seesaw", "label": v.label, "launcher": list(v.launcher), "llm_kwargs": v.llm_kwargs}
               for v in args.seesaw_rows] + \
              [{"engine": "vllm", "label": k, "tp": tp, "pp": pp} for k, (tp, pp) in VLLM_LAYOUTS.items()]
    out.write_text(json.dumps({"meta": meta, "workloads": described, "layouts": layouts, "rows": rows,
                               "baseline_pairs": pairs, "runs": runs}, indent=1))
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if rows and plot_rows(rows, png) else ""))
    return 0 if rows and not any(r.get("failed") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
