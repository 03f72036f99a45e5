"""Each bad input of a generation job ends with one `error:` line naming the problem and exit status 2.
The CLI runs in this process (`seesaw_ds.jobs.generate.main`), as `launch/generate.py` calls it."""
import json

import pytest

from seesaw_ds.jobs.generate import main
from tests.launch.conftest import recipe_dict, write_recipe


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

