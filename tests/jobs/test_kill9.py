"""kill -9 a job process at random moments after a shard lands, rerun: exactly one row per input, equal to an
uninterrupted run. The job runs in a forked child process (a real process, SIGKILLed; forking skips re-importing
torch, which would dominate the test's time); `python -m tests.jobs.kill9_job` runs the same job by hand."""
import base64
import glob
import multiprocessing
import os
import random
import signal
import time

import pyarrow.parquet as pq

from seesaw_ds.jobs.outputs import existing_shards
from tests.jobs.conftest import write_jsonl
from tests.jobs.kill9_job import main as run_job_process

NUM_ROWS = 400
KILLS = 3


def rows_of(directory):
    rows = []
    for _, _, path in existing_shards(str(directory)):
        rows += pq.read_table(path).to_pylist()
    return rows


def start_job(input_path, out_dir, step_seconds):
    process = multiprocessing.get_context("fork").Process(target=run_job_process,
                                                          args=(input_path, str(out_dir), str(step_seconds)))
    process.start()
    return process


def run_to_end(input_path, out_dir):
    process = start_job(input_path, out_dir, 0.0)
    process.join(timeout=300)
    assert process.exitcode == 0


def kill_after_next_shard(input_path, out_dir, rng):
    """Start the job, wait for one more shard than it found, SIGKILL it a random 0-0.3 s later."""
    shards_before = len(existing_shards(str(out_dir))) if os.path.isdir(out_dir) else 0
    job = start_job(input_path, out_dir, step_seconds=0.01)
    deadline = time.monotonic() + 120
    while not os.path.isdir(out_dir) or len(existing_shards(str(out_dir))) <= shards_before:
        assert job.exitcode is None, f"the job ended early with {job.exitcode}"
        assert time.monotonic() < deadline, "no new shard within 120 s"
        time.sleep(0.002)
    delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    assert job.exitcode is None, f"the job finished before the kill ({delay:.3f} s after a shard)"
    os.kill(job.pid, signal.SIGKILL)
    job.join()
    assert job.exitcode == -signal.SIGKILL
    return delay


def test_kill9_then_rerun_gives_exactly_one_row_per_input(tmp_path):
    rows = [{"key": f"q{i:04d}", "text": f"question {i}: " + "why " * (i % 4), "n": 1 + i % 7, "blob": str(i)}
            for i in range(NUM_ROWS)]
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    run_to_end(input_path, tmp_path / "reference")
    reference = {r["id"]: r for r in rows_of(tmp_path / "reference")}
    assert len(reference) == NUM_ROWS

    out, rng, delays = tmp_path / "out", random.Random(), []
    for _ in range(KILLS):
        delays.append(kill_after_next_shard(input_path, out, rng))
        interrupted = rows_of(out)  # every shard left behind is complete and readable
        assert 0 < len(interrupted) < NUM_ROWS, f"kills after {delays}"
        assert len({r["id"] for r in interrupted}) == len(interrupted), f"kills after {delays}"

    run_to_end(input_path, out)
    final = rows_of(out)
    assert len(final) == NUM_ROWS and len({r["id"] for r in final}) == NUM_ROWS, f"kills after {delays}"
    assert {r["id"]: r for r in final} == reference
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_kill9_in_the_middle_of_a_shard_write(tmp_path):
    """Large rows make each shard write take a while; the kill lands while its temporary file is being written."""
    rows = [{"key": f"b{i:03d}", "text": f"big row {i}", "n": 2, "blob": base64.b64encode(os.urandom(300_000)).decode()}
            for i in range(40)]
    input_path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    job = start_job(input_path, out, step_seconds=0.0)
    deadline = time.monotonic() + 120
    while not glob.glob(str(out / ".tmp-part-*")):
        assert job.exitcode is None and time.monotonic() < deadline, "no shard write seen"
        time.sleep(0.0005)
    os.kill(job.pid, signal.SIGKILL)
    job.join()
    partial = glob.glob(str(out / ".tmp-part-*"))
    assert partial, "the write finished before the kill: the test did not hit a write"
    assert len(rows_of(out)) in (0, 10, 20, 30)  # complete shards only, each readable
    run_to_end(input_path, out)
    final = rows_of(out)
    assert sorted(r["id"] for r in final) == [r["key"] for r in rows]
    assert {r["id"]: r["blob"] for r in final} == {r["key"]: r["blob"] for r in rows}
    assert not glob.glob(str(out / ".tmp-*"))
