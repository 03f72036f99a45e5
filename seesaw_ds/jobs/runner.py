"""The job loop: feed the engine from the prompt items, collect finished requests, write shards.

    add requests until `engine.window` are in flight -> engine.step() -> finished rows to the writer
    -> a shard every output.shard_rows rows or output.flush_seconds seconds

With sampling.n > 1 one request per input row asks for n samples (one prefill); its finished output becomes
n rows (sample_index 0..n-1) added to the writer together, so a row is written whole or not at all.

NOTE: at most `recipe.engine.window` items are held at once, so a huge dataset never sits in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
import time
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm

from seesaw_ds.engine.sampling_params import sample_seed
from seesaw_ds.jobs.inputs import PromptItem, PromptSource
from seesaw_ds.jobs.outputs import ShardWriter
from seesaw_ds.jobs.recipe import Recipe


class Engine(Protocol):
    stats: Any    # EngineStats: .stage, .switches, .summary()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: Any) -> None: ...
    def step(self) -> list[Any]: ...
    def has_unfinished(self) -> bool: ...


def row_seed(base_seed: int | None, row_id: str) -> int | None:
    """Per-row sampling seed: the same row gets the same seed in every run, batch and replica."""
    if base_seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def samples_of(output: Any, n: int) -> list[Any]:
    """The n samples of a finished request, in index order (each: token_ids, text, finish_reason, logprobs).
    An output without `samples` (an engine that only knows n = 1) is its own single sample."""
    samples = list(getattr(output, "samples", None) or [output])
    indexes = [getattr(sample, "index", i) for i, sample in enumerate(samples)]
    if indexes != list(range(n)):
        raise RuntimeError(f"request {output.request_id!r} finished with samples {indexes}, expected 0..{n - 1}")
    return samples


def build_rows(item: PromptItem, output: Any, params: dict[str, Any], model: str, layouts: str,
               token_ids: bool) -> list[dict[str, Any]]:
    """The output rows of a finished request: one per sample, `sample_index` set when params["n"] > 1."""
    n = params.get("n", 1)
    rows = [build_row(item, sample, params, model, layouts, token_ids, index)
            for index, sample in enumerate(samples_of(output, n))]
    if n > 1:
        rows = [{"id": row["id"], "sample_index": index} | row for index, row in enumerate(rows)]
    return rows


def build_row(item: PromptItem, output: Any, params: dict[str, Any], model: str, layouts: str,
              token_ids: bool, sample_index: int = 0) -> dict[str, Any]:
    """One output row from one sample of a finished request (token_ids, text, finish_reason); its `seed` is
    the seed the sample drew with (the engine's rule, `sample_seed`: sample 0 keeps the row's seed)."""
    row = {"id": item.row_id, "row_index": item.row_index, "prompt": item.prompt_text, "completion": output.text,
           "prompt_tokens": len(item.prompt_token_ids), "completion_tokens": len(output.token_ids),
           "finish_reason": output.finish_reason, "temperature": params["temperature"], "top_k": params["top_k"],
           "top_p": params["top_p"], "max_tokens": params["max_tokens"],
           "seed": sample_seed(params["seed"], sample_index), "model": model, "layouts": layouts}
    if token_ids:
        row["prompt_token_ids"] = list(item.prompt_token_ids)
        row["completion_token_ids"] = list(output.token_ids)
    if params.get("logprobs") is not None:  # per output token: [{token_id, logprob}, ...]
        row["logprobs"] = [[{"token_id": t, "logprob": lp} for t, lp in sorted((entry or {}).items())]
                           for entry in (output.logprobs or [])]
    row.update(item.extra)
    return row


@dataclasses.dataclass
class JobSummary:
    replica: int = 0
    num_replicas: int = 1
    rows_written: int = 0
    already_done: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_skipped_row: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    shards_written: int = 0
    samples_per_row: int = 1      # sampling.n: rows_written counts output rows, n per input row

    @property
    def requests_per_second(self) -> float:
        """Input rows (requests) per second."""
        requests = self.rows_written / self.samples_per_row
        return requests / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def output_tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def table(self) -> str:
        written = f"{self.rows_written}"
        if self.samples_per_row > 1:
            written += f" ({self.rows_written // self.samples_per_row} inputs x {self.samples_per_row} samples)"
        lines = [("rows written", written), ("rows done earlier", f"{self.already_done}")]
        for reason, count in sorted(self.skipped.items()):
            lines.append((f"skipped: {reason}", f"{count} (first at row {self.first_skipped_row.get(reason)})"))
        lines += [("truncated prompts", f"{self.truncated}"), ("shards written", f"{self.shards_written}"),
                  ("prompt tokens", f"{self.prompt_tokens}"), ("output tokens", f"{self.completion_tokens}"),
                  ("wall time", f"{self.wall_seconds:.1f} s"), ("requests/s", f"{self.requests_per_second:.2f}"),
                  ("tokens/s (prompt+output)", f"{self.tokens_per_second:.1f}"),
                  ("output tokens/s", f"{self.output_tokens_per_second:.1f}")]
        width = max(len(k) for k, _ in lines)
        head = f"job summary (replica {self.replica} of {self.num_replicas})"
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in lines])


def _show_rate(bar: Any, engine: Any, summary: JobSummary, seconds: float) -> None:
    """The bar's postfix: the engine's current stage, the prompt tokens prefilled so far (this rank's
    stage of a pipeline: it moves during a long prefill pass) and tokens/s (prompt + output) so far."""
    rate = (summary.prompt_tokens + summary.completion_tokens) / max(seconds, 1e-9)
    bar.set_postfix(stage=engine.stats.stage or "starting", prefilled=f"{engine.stats.prefill_tokens_done} tok",
                    tok_s=f"{rate:.0f}", refresh=False)


def _tick(bar: Any, engine: Any, summary: JobSummary, start: float, clock: Callable[[], float],
          every_s: float = 0.5) -> threading.Thread | None:
    """Refresh the bar's postfix from a thread while one engine step runs long (a prefill stage can be one
    pipeline pass of many micro-batches); the thread ends when the bar closes."""
    if bar.disable:
        return None

    def loop() -> None:
        while not bar.disable:
            time.sleep(every_s)
            if not bar.disable:
                _show_rate(bar, engine, summary, clock() - start)
                bar.refresh()

    thread = threading.Thread(target=loop, name="seesaw-progress", daemon=True)
    thread.start()
    return thread


def _throughput(rows: int, summary: JobSummary, seconds: float, shards: int) -> dict[str, float]:
    seconds = max(seconds, 1e-9)
    return {"rows": rows, "requests_per_s": rows / seconds,
            "tokens_per_s": (summary.prompt_tokens + summary.completion_tokens) / seconds,
            "output_tokens_per_s": summary.completion_tokens / seconds, "shards": shards}


def _keep_finished_rows(writer: ShardWriter) -> None:
    """On the way out of an error or interrupt: write the rows already finished, so a rerun does not redo
    them; a failure here must not hide the error that ended the job."""
    if not writer.rows:
        return
    try:
        writer.flush()
    except Exception as err:  # noqa: BLE001 - the job's own error is the one to report
        print(f"warning: {len(writer.rows)} finished rows were not written ({type(err).__name__}: {err}); "
              f"a rerun redoes them", file=sys.stderr)


def run_job(recipe: Recipe, source: PromptSource, engine: Engine, writer: ShardWriter, *,
            params_factory: Callable[..., Any], model_label: str, layouts_label: str,
            show_progress: bool = True, log_fn: Callable[[dict], None] | None = None,
            on_row: Callable[[dict], None] | None = None, print_fn: Callable[[str], None] | None = print,
            clock: Callable[[], float] = time.monotonic) -> JobSummary:
    """Run every not-yet-written row of `source` through `engine`; returns the summary (printed if print_fn).

    `log_fn(metrics)` gets throughput about twice a second and once at the end; `on_row(row)` sees each row.
    Every rank of a replica runs this loop with the same source (the engine steps in lockstep); only the
    replica's writer gets a real `writer`."""
    base = recipe.sampling_kwargs()
    summary = JobSummary(replica=source.replica, num_replicas=source.num_replicas, samples_per_row=base["n"])
    items = source.items(skip_ids=writer.done_ids)
    pending: dict[str, tuple[PromptItem, dict[str, Any]]] = {}
    window, shard_rows = recipe.engine.window, recipe.output.shard_rows
    start = last_flush = last_postfix = clock()
    bar = tqdm(total=source.rows_for_replica(), disable=not show_progress, unit="row", dynamic_ncols=True)
    _tick(bar, engine, summary, start, clock)
    finished_rows = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                params = base | {"max_tokens": item.max_tokens, "seed": row_seed(base["seed"], item.row_id)}
                engine.add_request(item.row_id, item.prompt_token_ids, params_factory(**params))
                pending[item.row_id] = (item, params)
            if not pending:
                break
            if not engine.has_unfinished():
                raise RuntimeError(f"the engine has no unfinished requests while {len(pending)} rows are pending "
                                   f"(e.g. id {next(iter(pending))!r})")
            for output in engine.step():
                item, params = pending.pop(output.request_id)
                rows = build_rows(item, output, params, model_label, layouts_label, recipe.output.token_ids)
                for row in rows:     # NOTE: a row's samples in one go: a flush never splits them
                    writer.add(row)
                    if on_row is not None:
                        on_row(row)
                summary.prompt_tokens += len(item.prompt_token_ids)
                summary.completion_tokens += sum(row["completion_tokens"] for row in rows)
                finished_rows += 1
            now = clock()
            while len(writer.rows) >= shard_rows:
                writer.flush(shard_rows)
                last_flush = now
            if writer.rows and now - last_flush >= recipe.output.flush_seconds:
                writer.flush()
                last_flush = now
            bar.n = source.stats.already_done + sum(source.stats.skipped.values()) + finished_rows
            if now - last_postfix >= 0.5:
                _show_rate(bar, engine, summary, now - start)
                bar.refresh()
                last_postfix = now
                if log_fn is not None:
                    log_fn(_throughput(finished_rows, summary, now - start, writer.shards_written))
        writer.flush()
        if log_fn is not None:
            log_fn(_throughput(finished_rows, summary, clock() - start, writer.shards_written))
    finally:
        _keep_finished_rows(writer)
        bar.n = source.stats.handled - len(pending)
        _show_rate(bar, engine, summary, clock() - start)   # NOTE: a job under 0.5 s shows its rate too
        bar.close()
    summary.wall_seconds = clock() - start
    summary.rows_written = writer.rows_written
    summary.shards_written = writer.shards_written
    summary.already_done = source.stats.already_done
    summary.skipped = dict(source.stats.skipped)
    summary.first_skipped_row = dict(source.stats.first_skipped_row)
    summary.truncated = source.stats.truncated
    if print_fn is not None and show_progress:
        print_fn(summary.table())
    return summary
