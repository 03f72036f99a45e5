"""Each bad input of a generation job ends with one `error:` line naming the problem and exit status 2, and
the shards written before a bad row stay valid: a rerun resumes from them.
The CLI runs in this process (`seesaw_ds.jobs.generate.main`), as `launch/generate.py` calls it."""
import glob
import json

import pytest

from seesaw_ds.jobs.generate import main
from tests.launch.conftest import MAX_TOKENS, recipe_dict, write_recipe


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch, tmp_path):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def rows_file(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def error_of(capsys, argv):
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("launch/generate.py: error: "), err
    print(err[0])
    return err[0]


def run_recipe_file(capsys, tmp_path, raw, *overrides):
    return error_of(capsys, ["--config", write_recipe(tmp_path / "r.yaml", raw), *overrides])


@pytest.fixture
def base(tiny_model, articles, tmp_path):
    return recipe_dict(tiny_model[0], articles, str(tmp_path / "out"))


def test_malformed_yaml(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: [unclosed\ndata: {}\n")
    line = error_of(capsys, ["--config", str(path)])
    assert "malformed YAML" in line and "line 3" in line and str(path) in line


def test_unknown_key(capsys, tmp_path, base):
    base["sampling"]["temprature"] = 0.5
    line = run_recipe_file(capsys, tmp_path, base)
    assert "sampling.temprature is unknown; did you mean sampling.temperature?" in line


def test_unknown_key_on_the_command_line(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "engine.max_model_length=10")
    assert "engine.max_model_length is unknown" in line


def test_missing_column(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "data.columns.carry=[summary]")
    assert "data.columns.carry names column 'summary'" in line and "columns: id, article, abstract" in line


def test_empty_prompt(capsys, tmp_path, base):
    base["data"] = {"source": rows_file(tmp_path, [{"text": "fine"}, {"text": ""}]), "columns": {"prompt": "text"},
                    "bad_rows": "error"}
    line = run_recipe_file(capsys, tmp_path, base)
    assert "data row 1" in line and "empty prompt" in line


def test_non_text_prompt(capsys, tmp_path, base):
    base["data"] = {"source": rows_file(tmp_path, [{"text": ["a", "list"]}]), "columns": {"prompt": "text"},
                    "bad_rows": "error"}
    line = run_recipe_file(capsys, tmp_path, base)
    assert "data row 0" in line and "non-text prompt" in line


def test_prompt_over_the_context_limit(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "data.over_limit=error", "engine.max_model_len=40")
    assert "over the limit of 32" in line and "engine.max_model_len 40 - max_tokens 8" in line


def test_missing_model_path(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, f"model.name={tmp_path}/no-such-model")
    assert "model path not found" in line and "no-such-model" in line


def test_unreachable_hub_without_fallback(capsys, tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: the connection is refused at once
    line = run_recipe_file(capsys, tmp_path, base, "data.source=some-org/some-dataset")
    assert "data.source some-org/some-dataset" in line and "cannot be reached" in line and "data.fallback" in line


def test_layouts_that_do_not_fit_the_world(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "parallel={prefill: {pp: 2}, decode: {tp: 2}}")
    assert "recipe key parallel does not fit" in line and "world size is 1" in line and "--num_gpus 2" in line



def shard_rows(out_dir, tmp_path):
    """Every row of the output folder, by id, read with the documented `datasets` call."""
    import datasets
    loaded = datasets.load_dataset("parquet", data_files=f"{out_dir}/part-*.parquet", split="train",
                                   cache_dir=str(tmp_path / "load-cache"))
    rows = {r["id"]: r for r in loaded}
    assert len(rows) == len(loaded), "an id is written twice"
    return rows


def test_a_bad_row_after_written_shards_leaves_them_valid_and_resumable(capsys, tmp_path, base):
    bad = 20
    rows = [{"id": f"doc{i:03d}", "text": f"Summarize: article {i}: " + "lorem ipsum " * (1 + i % 3)}
            for i in range(24)]
    every_id = {r["id"] for r in rows}
    source = rows_file(tmp_path, [dict(r, text="") if i == bad else r for i, r in enumerate(rows)])
    out = tmp_path / "out"
    # request_window 4: row 20 enters the engine only when <= 3 rows are in flight, i.e. after >= 17 rows have
    # finished, and <= 3 of those wait for a full shard of 4, so >= 4 shards are on disk before the error
    base["data"] = {"source": source, "columns": {"prompt": "text", "id": "id"}, "bad_rows": "error"}
    base["engine"]["request_window"] = 4
    recipe = write_recipe(tmp_path / "r.yaml", base)

    line = error_of(capsys, ["--config", recipe])
    assert f"data row {bad}" in line and "empty prompt" in line
    written = shard_rows(out, tmp_path)
    assert len(written) >= 16 and len(written) % 4 == 0 and set(written) < every_id - {f"doc{bad:03d}"}
    assert all(r["completion_tokens"] == MAX_TOKENS for r in written.values())
    assert not glob.glob(str(out / ".tmp-*"))

    # the same folder under bad_rows=skip (the same rows, minus the bad one): resumes, writes the rest once
    assert main(["--config", recipe, "data.bad_rows=skip"]) == 0
    capsys.readouterr()
    report = json.load(open(out / "job_summary.json"))["total"]
    assert report["already_done"] == len(written) and report["skipped/empty prompt"] == 1
    after_skip = shard_rows(out, tmp_path)
    assert set(after_skip) == every_id - {f"doc{bad:03d}"}
    assert all(after_skip[key] == row for key, row in written.items())   # earlier shards untouched

    # the bad row fixed, the first command again: only that row is generated; one row per input id
    rows_file(tmp_path, rows)
    assert main(["--config", recipe]) == 0
    capsys.readouterr()
    report = json.load(open(out / "job_summary.json"))["total"]
    assert report["rows_written"] == 1 and report["already_done"] == len(rows) - 1
    final = shard_rows(out, tmp_path)
    assert set(final) == every_id and final[f"doc{bad:03d}"]["prompt"] == rows[bad]["text"]
