"""`deepspeed --num_gpus 2 launch/generate.py`, the real launcher: data parallel (every row once, split by
row index, one progress bar on rank 0), PP2 prefill -> TP2 decode killed with SIGKILL at a random moment then
resumed (exactly one row per input, equal to HF greedy generate, which the uninterrupted one-process run also
matches), and PP2 -> TP2 tracked on wandb offline (the distributed engine's stage switches and KV tiers)."""
import glob
import json
import os
import random
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from seesaw_ds.jobs.outputs import existing_shards
from seesaw_ds.parallel.layout import StageLayouts
from tests.launch.conftest import (GENERATE, NUM_ROWS, REPO, deepspeed_command, free_port, job_bars, job_env,
                                   rank_log, recipe_dict, run_checked, write_recipe)
from tests.launch.wandb_records import read_run

pytestmark = pytest.mark.slow


def output_rows(directory):
    return [r for _, _, path in existing_shards(str(directory)) for r in pq.read_table(path).to_pylist()]


def shm_files(port=None):
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if (port is None and n.startswith("seesaw-kv-")) or (port and f"_{port}_" in n)}


def assert_rows_match(rows, reference_rows):
    assert len(rows) == NUM_ROWS and len({r["id"] for r in rows}) == NUM_ROWS
    for row in rows:
        want = reference_rows[row["id"]]
        assert row["prompt_token_ids"] == want["prompt_token_ids"], row["id"]
        assert row["completion_token_ids"] == want["completion_token_ids"], row["id"]
        assert row["abstract"] == want["abstract"]


def test_data_parallel_two_ranks_write_every_row_once(tiny_model, articles, reference_rows, tmp_path):
    port, kv_before = free_port(), shm_files()
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel={"dp": 2}))
    run_checked(deepspeed_command(2, port, recipe, rank_logs=tmp_path / "logs"), job_env(tmp_path))
    rank0, rank1 = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 1)
    rows = output_rows(tmp_path / "out")
    assert_rows_match(rows, reference_rows)
    assert all(row["layouts"] == "tp1pp1 dp=2" for row in rows)
    by_replica = {}              # the shard name says which replica wrote it: each writes the rows dealt to it
    for replica, _, path in existing_shards(str(tmp_path / "out")):
        by_replica.setdefault(replica, []).extend(pq.read_table(path)["row_index"].to_pylist())
    assert sorted(by_replica) == [0, 1] and [len(by_replica[r]) for r in (0, 1)] == [NUM_ROWS // 2] * 2
    assert sorted(by_replica[0] + by_replica[1]) == list(range(NUM_ROWS))
    assert "layouts: tp=1 pp=1 dp=2" in rank0 and "2 replicas of 1 rank" in rank0
    # one bar, on rank 0, over its replica's 20 rows; rank 1 writes replica 1's rows silently
    assert job_bars(rank0) and job_bars(rank0)[-1][:2] == (NUM_ROWS // 2, NUM_ROWS // 2)
    assert not job_bars(rank1) and "job summary" not in rank1
    total = json.load(open(tmp_path / "out" / "job_summary.json"))["total"]
    assert total["rows_written"] == NUM_ROWS and total["num_replicas"] == 2
    assert not shm_files(port) and not (shm_files() - kv_before)


# `launch/generate.py` with the fold margin at zero: whatever the planner predicts, `parallel: seesaw` on two ranks
# of one machine runs folded, so that the run itself is under test (the decision is tests/launch/test_world.py's)
ALWAYS_FOLD = """import sys
sys.path.insert(0, {repo!r})
import seesaw_ds.jobs.world as world
world.FOLD_MARGIN = 0.0
from seesaw_ds.jobs.generate import main
sys.exit(main())
"""


def test_a_folded_job_runs_on_rank0_while_rank1_waits(tiny_model, articles, reference_rows, tmp_path):
    port, kv_before = free_port(), shm_files()
    script = tmp_path / "generate_folded.py"
    script.write_text(ALWAYS_FOLD.format(repo=REPO))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel="seesaw"))
    cmd = deepspeed_command(2, port, recipe, rank_logs=tmp_path / "logs")
    cmd[cmd.index(GENERATE)] = str(script)
    # a short collective timeout: rank 0 tells the waiting rank it is busy every 2 s of its job
    run_checked(cmd, job_env(tmp_path, SEESAW_COLLECTIVE_TIMEOUT_S="8"))
    rank0, rank1 = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 1)
    rows = output_rows(tmp_path / "out")
    assert_rows_match(rows, reference_rows)
    assert all(row["layouts"] == "tp1pp1 dp=1" for row in rows)
    assert {replica for replica, _, _ in existing_shards(str(tmp_path / "out"))} == {0}
    assert "layouts: tp=1 pp=1 dp=1 (2 ranks, rank 0 alone on " in rank0, rank0[-3000:]
    assert "parallel: seesaw runs one rank on every core (local (" in rank0 and "rank 1 idle" in rank0
    assert job_bars(rank0) and job_bars(rank0)[-1][:2] == (NUM_ROWS, NUM_ROWS)
    assert not job_bars(rank1) and "job summary" not in rank1
    total = json.load(open(tmp_path / "out" / "job_summary.json"))["total"]
    assert total["rows_written"] == NUM_ROWS and total["num_replicas"] == 1
    assert not shm_files(port) and not (shm_files() - kv_before)


def test_seesaw_default_names_its_layouts_and_why(tiny_model, articles, reference_rows, tmp_path):
    # `parallel: seesaw` asks the planner (this machine's calibration) whether the PP2 -> TP2 pair pays here;
    # whichever it runs, one start-up line names it and why, and the rows are the reference's
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel="seesaw"))
    proc = run_checked(deepspeed_command(2, free_port(), recipe), job_env(tmp_path))
    assert_rows_match(output_rows(tmp_path / "out"), reference_rows)
    lines = proc.stdout.splitlines()
    [why] = [line for line in lines if line.startswith("parallel: seesaw")]
    if why.startswith("parallel: seesaw runs one rank on every core"):    # predicted FOLD_MARGIN x faster
        label = "1proc"
        assert "rank 1 idle: the planner predicts it at " in why, why
    elif why.startswith("parallel: seesaw runs "):          # a static layout predicted at least as fast
        label = why.split(" runs ")[1].split(",")[0]
        assert "not the pair PP2->TP2: the planner predicts the pair at " in why and "runs the pair anyway" in why
    else:
        label = why.split("the planner predicts ")[1].split(" at ")[0]
        assert label == "PP2->TP2", why
    assert f"layouts: {StageLayouts.from_spec(label).describe()} (2 ranks" in proc.stdout, (why, proc.stdout[-2000:])


def start_job(cmd, env):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)     # its own process group: launcher + both ranks


def test_pp2_tp2_killed_at_a_random_moment_then_resumed(tiny_model, articles, reference_rows, tmp_path):
    rng = random.Random()
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(out),
                                                           parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}}))
    env = job_env(tmp_path)
    killed_port = free_port()
    job = start_job(deepspeed_command(2, killed_port, recipe), env)
    deadline = time.monotonic() + 400
    while not (out.is_dir() and existing_shards(str(out))):
        assert job.poll() is None, f"the job ended before its first shard:\n{job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no shard within 400 s"
        time.sleep(0.01)
    delay = rng.uniform(0.0, 0.3)
    time.sleep(delay)
    alive = job.poll() is None
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    job.stdout.close()
    for name in shm_files(killed_port):   # a SIGKILLed DeepSpeed rank leaves its all-reduce buffer behind
        os.unlink(os.path.join("/dev/shm", name))
    interrupted = output_rows(out)
    assert len({r["id"] for r in interrupted}) == len(interrupted), f"duplicates after a kill {delay:.3f} s in"
    print(f"killed {delay:.3f} s after the first shard ({'running' if alive else 'already finished'}); "
          f"{len(interrupted)} of {NUM_ROWS} rows were written")
    # alive: at least the first shard is there; all rows may be too (the job was still shutting down)
    assert 0 < len(interrupted) <= NUM_ROWS, f"kill {delay:.3f} s after the first shard"

    port, kv_before = free_port(), shm_files()
    proc = run_checked(deepspeed_command(2, port, recipe), env)
    rows = output_rows(out)
    assert_rows_match(rows, reference_rows)
    assert {r["id"] for r in interrupted} <= {r["id"] for r in rows}
    assert "layouts: prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1" in proc.stdout
    report = json.load(open(out / "job_summary.json"))
    assert report["total"]["already_done"] == len(interrupted)
    assert report["total"]["rows_written"] == NUM_ROWS - len(interrupted)
    if report["total"]["rows_written"]:
        assert report["replicas"][0]["engine"]["num_switches"] >= 1   # few remaining rows: maybe one cycle
    assert not glob.glob(str(out / ".tmp-*"))
    assert not shm_files(port) and not (shm_files() - kv_before)


def test_pp2_tp2_logs_stage_switches_and_kv_tiers_to_wandb(tiny_model, articles, reference_rows, tmp_path):
    layouts = {"prefill": {"pp": 2}, "decode": {"tp": 2}}
    wandb_cfg = {"wandb": {"project": "seesaw-tests", "name": "pp2-tp2", "mode": "offline"}}
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                                                           parallel=layouts, tracking=wandb_cfg))
    env = job_env(tmp_path, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    run_checked(deepspeed_command(2, free_port(), recipe, rank_logs=tmp_path / "logs"), env)
    assert_rows_match(output_rows(tmp_path / "out"), reference_rows)
    rank0, rank1 = rank_log(tmp_path / "logs", 0), rank_log(tmp_path / "logs", 1)
    bars = job_bars(rank0)   # (rows done, rows total, stage, tokens/s); rank 1 steps the engine silently
    assert bars and bars[-1][:2] == (NUM_ROWS, NUM_ROWS) and {b[2] for b in bars} <= {"prefill", "decode"}
    assert not job_bars(rank1) and "wandb: run" not in rank1

    run_id = json.load(open(tmp_path / "out" / "job_summary.json"))["wandb_run_id"]
    [run_file] = glob.glob(str(tmp_path / "wandb" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    run = read_run(run_file)
    assert run["config"]["layouts"] == "prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1"
    assert run["config"]["world_size"] == 2
    # KV-tier metrics come from the seesaw scheduler, sampled with every throughput line
    kv_lines = [h for h in run["history"] if "kv/host_occupancy" in h]
    assert kv_lines and all(0.0 <= h["kv/host_occupancy"] <= 1.0 for h in kv_lines)
    assert all("kv/stashed" in h and "kv/waiting" in h and "engine/stage_is_decode" in h for h in kv_lines)
    assert kv_lines[-1]["job/rows"] == NUM_ROWS
    switches = run["summary"]["engine/num_switches"]
    assert switches >= 1 and max(h.get("engine/num_switches", 0) for h in run["history"]) == switches
    # the stage_switches table: one row per switch of the distributed engine
    assert run["summary"]["stage_switches/_type"] == "table-file"
    assert run["summary"]["stage_switches/nrows"] == switches
    table = json.load(open(os.path.join(os.path.dirname(run_file), "files", run["summary"]["stage_switches/path"])))
    assert table["columns"][:2] == ["index", "to"]
    stages = [values[1] for values in table["data"]]   # the stage switched to; each switch changes it
    assert set(stages) == {"prefill", "decode"} and all(a != b for a, b in zip(stages, stages[1:]))
