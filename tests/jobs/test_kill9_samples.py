"""kill -9 a job with sampling.n = 3 at random moments after a shard lands, rerun: every (id, sample_index)
exactly once, equal to an uninterrupted run. The job runs in a forked child process (a real process, SIGKILLed),
as in test_kill9.py, on the fake engine of n samples."""
import multiprocessing
import os
import random
import signal
import time

import pyarrow.parquet as pq

from seesaw_ds import SamplingParams
from seesaw_ds.jobs.job import run_recipe
from seesaw_ds.jobs.outputs import existing_shards
from seesaw_ds.jobs.recipe import parse_recipe
from tests.jobs.conftest import write_jsonl
from tests.jobs.fake_samples import SamplingEngine
from tests.jobs.tiny_tokenizer import char_tokenizer

NUM_ROWS = 150
N = 3
KILLS = 2


class FakeLLM:
    def __init__(self, step_seconds: float):
        self.tokenizer = char_tokenizer()
        self.engine = SamplingEngine(self.tokenizer, max_num_seqs=12, step_seconds=step_seconds)


def job(input_path: str, out_dir: str, step_seconds: float) -> None:
    recipe = parse_recipe({
        "data": {"source": input_path, "columns": {"prompt": "text", "id": "key", "max_tokens": "m"}},
        "sampling": {"temperature": 0.8, "seed": 11, "n": N},
        "engine": {"request_window": 8},
        "output": {"dir": out_dir, "shard_rows": 10},     # 10 rounds up to 12: four input rows per shard
    })
    run_recipe(recipe, FakeLLM(step_seconds), params_factory=SamplingParams, is_main=False)


def start_job(input_path, out_dir, step_seconds):
    process = multiprocessing.get_context("fork").Process(target=job, args=(input_path, str(out_dir), step_seconds))
    process.start()
    return process


def rows_of(directory):
    return [r for _, _, path in existing_shards(str(directory)) for r in pq.read_table(path).to_pylist()]


def keyed(rows):
    out = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(out) == len(rows), "an (id, sample_index) written twice"
    return out


def kill_after_next_shard(input_path, out_dir, rng):
    shards_before = len(existing_shards(str(out_dir))) if os.path.isdir(out_dir) else 0
    process = start_job(input_path, out_dir, step_seconds=0.01)
    deadline = time.monotonic() + 120
    while not os.path.isdir(out_dir) or len(existing_shards(str(out_dir))) <= shards_before:
        assert process.exitcode is None, f"the job ended early with {process.exitcode}"
        assert time.monotonic() < deadline, "no new shard within 120 s"
        time.sleep(0.002)
    delay = rng.uniform(0.0, 0.2)
    time.sleep(delay)
    assert process.exitcode is None, f"the job finished before the kill ({delay:.3f} s after a shard)"
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    return delay


def test_kill9_then_rerun_gives_every_sample_exactly_once(tmp_path):
    rows = [{"key": f"q{i:04d}", "text": f"question {i}: " + "why " * (i % 4), "m": 1 + i % 7}
            for i in range(NUM_ROWS)]
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    reference_run = start_job(input_path, tmp_path / "reference", 0.0)
    reference_run.join(timeout=300)
    assert reference_run.exitcode == 0
    reference = keyed(rows_of(tmp_path / "reference"))
    assert sorted(reference) == sorted((r["key"], i) for r in rows for i in range(N))

    out, rng, delays = tmp_path / "out", random.Random(), []
    for _ in range(KILLS):
        delays.append(kill_after_next_shard(input_path, out, rng))
        interrupted = keyed(rows_of(out))
        ids = {key for key, _ in interrupted}
        assert 0 < len(ids) < NUM_ROWS and len(interrupted) == N * len(ids), f"kills after {delays}"

    final_run = start_job(input_path, out, 0.0)
    final_run.join(timeout=300)
    assert final_run.exitcode == 0
    final = keyed(rows_of(out))
    assert final == reference, f"kills after {delays}"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
