"""launch/generate.py as a user runs it, one process: rows equal HF greedy generate, the progress bar, the
report, the wandb offline run (metrics, recipe, tables) and the ROUGE eval logged into the same run."""
import glob
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.launch.conftest import GENERATE, NUM_ROWS, job_bars, job_env, recipe_dict, run_checked, write_recipe
from tests.launch.wandb_records import read_run


def output_rows(directory):
    return {r["id"]: r for path in sorted(glob.glob(os.path.join(directory, "part-*.parquet")))
            for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def one_rank_run(tiny_model, articles, reference_rows, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-rank")
    raw = recipe_dict(tiny_model[0], articles, str(tmp / "out"),
                      tracking={"wandb": {"project": "seesaw-tests", "name": "one-rank", "samples": 5}})
    recipe = write_recipe(tmp / "recipe.yaml", raw)
    proc = run_checked([sys.executable, GENERATE, "--config", recipe], job_env(tmp, WANDB_DIR=str(tmp / "wandb")))
    return tmp, proc


def test_rows_equal_hf_greedy_and_report(one_rank_run, reference_rows, tiny_model):
    tmp, proc = one_rank_run
    tokenizer = tiny_model[2]
    rows = output_rows(str(tmp / "out"))
    assert sorted(rows) == sorted(reference_rows)
    for key, want in reference_rows.items():
        assert rows[key]["prompt_token_ids"] == want["prompt_token_ids"], key
        assert rows[key]["completion_token_ids"] == want["completion_token_ids"], key
        assert rows[key]["completion"] == tokenizer.decode(want["completion_token_ids"], skip_special_tokens=True)
        assert rows[key]["abstract"] == want["abstract"] and rows[key]["layouts"] == "tp1pp1 dp=1"
    assert "layouts: tp=1 pp=1 dp=1" in proc.stdout
    assert "job summary" in proc.stdout and "requests/s" in proc.stdout and "tokens/s" in proc.stdout
    report = json.load(open(tmp / "out" / "job_summary.json"))
    total = report["total"]
    assert total["rows_written"] == NUM_ROWS and total["completion_tokens"] == NUM_ROWS * 8
    assert total["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in reference_rows.values())
    assert report["replicas"][0]["engine"]["decode_tokens"] > 0


def test_progress_bar_shows_rows_tokens_per_s_and_stage(one_rank_run):
    _, proc = one_rank_run
    bars = job_bars(proc.stderr)   # (rows done, rows total, stage, tokens/s) per refresh
    assert bars, f"no job progress bar on stderr:\n{proc.stderr[-3000:]}"
    assert all(total == NUM_ROWS for _, total, _, _ in bars)
    assert [done for done, *_ in bars] == sorted(done for done, *_ in bars)
    done, _, stage, tokens_per_s = bars[-1]
    assert done == NUM_ROWS and tokens_per_s > 0
    stages = {s for _, _, s, _ in bars}   # what the engine's last step ran, at each refresh
    assert stages <= {"starting", "prefill", "decode"} and "decode" in stages, stages
    assert stage == "decode"   # the last rows finish on a decode step
    assert not job_bars(proc.stdout)   # stdout keeps the layouts line and the summary table


def test_wandb_offline_run_holds_recipe_metrics_and_tables(one_rank_run):
    tmp, proc = one_rank_run
    report = json.load(open(tmp / "out" / "job_summary.json"))
    run_id = report["wandb_run_id"]
    assert run_id and "logging offline" in proc.stdout
    [run_file] = glob.glob(str(tmp / "wandb" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    run = read_run(run_file)
    assert run["config"]["sampling"]["max_tokens"] == 8 and run["config"]["layouts"] == "tp=1 pp=1 dp=1"
    throughput = [h for h in run["history"] if "job/tokens_per_s" in h]
    assert throughput and throughput[-1]["job/rows"] == NUM_ROWS
    assert all("engine/decode_tokens" in h for h in throughput)
    assert run["summary"]["rows_written"] == NUM_ROWS and run["summary"]["tokens_per_s"] > 0
    assert run["summary"]["samples/nrows"] == 5 and run["summary"]["stage_switches/_type"] == "table-file"
    table = json.load(open(os.path.join(os.path.dirname(run_file), "files", run["summary"]["samples/path"])))
    rows = output_rows(str(tmp / "out"))
    for sample in (dict(zip(table["columns"], values)) for values in table["data"]):
        assert sample["completion"] == rows[sample["id"]]["completion"]
        assert sample["abstract"] == rows[sample["id"]]["abstract"]


def test_rouge_eval_scores_the_folder_and_logs_to_the_run(one_rank_run, capsys, monkeypatch):
    from evals.arxiv_rouge import main as rouge_main
    tmp, _ = one_rank_run
    run_id = json.load(open(tmp / "out" / "job_summary.json"))["wandb_run_id"]
    monkeypatch.setenv("WANDB_DIR", str(tmp / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert rouge_main([str(tmp / "out"), "--wandb-run-id", run_id, "--json", str(tmp / "sweep.json")]) == 0
    printed = capsys.readouterr().out
    assert "rouge1" in printed and "out" in printed
    scores = json.load(open(tmp / "out" / "rouge.json"))
    assert scores["rows"] == NUM_ROWS and set(scores["rouge"]) == {"rouge1", "rouge2", "rougeL"}
    deadline = time.monotonic() + 30   # NOTE: wandb's service may still be writing the file after finish()
    while True:
        resumed = [f for f in glob.glob(str(tmp / "wandb" / "wandb" / f"offline-run-*-{run_id}" / "*.wandb"))
                   if "eval/rouge1" in read_run(f)["summary"]]
        if resumed or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(resumed) == 1 and read_run(resumed[0])["summary"]["eval/rows"] == NUM_ROWS


def test_help_lists_every_recipe_key():
    from seesaw_ds.jobs.recipe import Recipe
    from seesaw_ds.jobs.schema import describe
    out = subprocess.run([sys.executable, GENERATE, "--help"], capture_output=True, text=True, timeout=60).stdout
    for key, *_ in describe(Recipe):
        assert f"  {key} " in out, key
