"""sampling.n in a job: recipe checks, n rows per input row (sample_index, per-sample seeds), whole rows per
shard, exact resume, the resume fingerprint. Reference: the fake engine's answer per sample seed."""
import json
import os

import pyarrow.parquet as pq
import pytest

from seesaw_ds import SamplingParams
from seesaw_ds.engine.sampling_params import sample_seed
from seesaw_ds.jobs.cli import recipe_from_argv
from seesaw_ds.jobs.job import run_recipe
from seesaw_ds.jobs.outputs import (MANIFEST_NAME, OutputError, ShardWriter, existing_shards, output_schema,
                                    read_completed_ids)
from seesaw_ds.jobs.recipe import parse_recipe
from seesaw_ds.jobs.runner import row_seed
from seesaw_ds.jobs.schema import RecipeError
from tests.jobs.conftest import write_jsonl
from tests.jobs.fake_engine import ReversingEngine
from tests.jobs.fake_samples import SamplingEngine, sample_completion

ROWS = [{"key": f"k{i:02d}", "text": f"row {i} says " + "xyz" * (i % 5), "m": 1 + i % 6} for i in range(17)]
N = 3


class FakeLLM:
    def __init__(self, tokenizer, engine=None):
        self.tokenizer = tokenizer
        self.engine = engine or SamplingEngine(tokenizer, max_num_seqs=4)


def recipe_n(tmp_path, n=N, **extra):
    path = tmp_path / "in.jsonl"     # written once: a rewrite would change the data's identity (mtime)
    raw = {"data": {"source": str(path) if path.exists() else write_jsonl(path, ROWS),
                    "columns": {"prompt": "text", "id": "key", "max_tokens": "m"}},
           "output": {"dir": str(tmp_path / "out"), "shard_rows": 5}, "engine": {"request_window": 4},
           "sampling": {"seed": 7, "temperature": 0.5, "n": n}}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


def expected(tokenizer, n=N, seed=7):
    """(id, sample_index) -> the fake's completion ids, finish reason and the sample's seed."""
    out = {}
    for r in ROWS:
        ids = tokenizer(r["text"])["input_ids"]
        for i in range(n):
            s = sample_seed(row_seed(seed, r["key"]), i)
            out[(r["key"], i)] = (*sample_completion(ids, r["m"], s, i), s)
    return out


def shard_rows(directory):
    return [pq.read_table(path).to_pylist() for _, _, path in existing_shards(str(directory))]


def by_key(shards):
    rows = [r for shard in shards for r in shard]
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows), "an (id, sample_index) written twice"
    return keyed


# ---- recipe ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, needle", [
    (0, "sampling.n must be an integer >= 1, got 0"), (-2, "sampling.n must be an integer >= 1, got -2"),
    (1.5, "sampling.n must be int, got 1.5"), ("three", "sampling.n must be int, got 'three'"),
    (True, "sampling.n must be int, got True"), (None, "sampling.n must be int, got None")])
def test_n_must_be_a_positive_int(value, needle):
    with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        parse_recipe({"data": {"source": "x.jsonl", "columns": {"prompt": "t"}},
                      "sampling": {"temperature": 0.5, "n": value}})


def test_n_above_one_needs_temperature_above_zero():
    base = {"data": {"source": "x.jsonl", "columns": {"prompt": "t"}}}
    with pytest.raises(RecipeError, match=r"sampling\.n must be 1 with greedy decoding .*got 2"):
        parse_recipe(base, ["sampling.n=2"])
    assert parse_recipe(base, ["sampling.n=2", "sampling.temperature=0.1"]).sampling_kwargs()["n"] == 2
    assert parse_recipe(base).sampling.n == 1


def test_bad_n_on_the_command_line_is_one_error_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: x.jsonl, columns: {prompt: t}}\nsampling: {temperature: 0.5}\n")
    with pytest.raises(SystemExit) as info:
        recipe_from_argv(["--config", str(path), "sampling.n=0"], prog="launch/generate.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0] == "launch/generate.py: error: recipe key sampling.n must be an integer >= 1, got 0"


# ---- rows ----------------------------------------------------------------------------------------------------
def test_n_rows_per_input_with_their_own_seeds_and_whole_rows_per_shard(tmp_path, tokenizer):
    recipe = recipe_n(tmp_path)
    summary = run_recipe(recipe, FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)
    shards = shard_rows(tmp_path / "out")
    got, want = by_key(shards), expected(tokenizer)
    assert sorted(got) == sorted(want)
    for (key, i), (completion, reason, seed) in want.items():
        row = got[(key, i)]
        assert (row["completion_token_ids"], row["finish_reason"], row["seed"]) == (completion, reason, seed)
        assert row["completion"] == tokenizer.decode(completion)
    assert got[("k03", 0)]["seed"] == row_seed(7, "k03")          # sample 0 keeps the row's seed
    assert len({got[("k03", i)]["completion"] for i in range(N)}) == N
    for shard in shards:   # shard_rows=5 rounds up to 6: two whole input rows, never a split one
        assert len(shard) == 6 or shard is shards[-1]
        counts = {}
        for r in shard:
            counts[r["id"]] = counts.get(r["id"], 0) + 1
        assert set(counts.values()) == {N}
    assert list(pq.read_schema(existing_shards(str(tmp_path / "out"))[0][2]).names[:3]) == \
        ["id", "sample_index", "row_index"]
    assert summary.rows_written == N * len(ROWS) and summary.samples_per_row == N
    assert summary.completion_tokens == sum(len(c) for c, _, _ in want.values())


def test_n_1_keeps_the_schema_without_sample_index(tmp_path, tokenizer):
    recipe = recipe_n(tmp_path, n=1)
    run_recipe(recipe, FakeLLM(tokenizer, ReversingEngine(tokenizer, 3)), params_factory=SamplingParams,
               is_main=False)
    [(_, _, first), *_] = existing_shards(str(tmp_path / "out"))
    assert "sample_index" not in pq.read_schema(first).names
    rows = [r for shard in shard_rows(tmp_path / "out") for r in shard]
    assert sorted(r["id"] for r in rows) == [r["key"] for r in ROWS]
    assert all(r["seed"] == row_seed(7, r["id"]) for r in rows)


# ---- resume --------------------------------------------------------------------------------------------------
class InterruptedEngine(SamplingEngine):
    def __init__(self, tokenizer, interrupt_at_step):
        super().__init__(tokenizer, max_num_seqs=4)
        self.steps, self.interrupt_at_step = 0, interrupt_at_step

    def step(self):
        self.steps += 1
        if self.steps == self.interrupt_at_step:
            raise KeyboardInterrupt
        return super().step()


@pytest.mark.parametrize("interrupt_at_step", [7, 16, 31])
def test_interrupted_job_resumes_every_sample_exactly_once(tmp_path, tokenizer, interrupt_at_step):
    recipe = recipe_n(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, FakeLLM(tokenizer, InterruptedEngine(tokenizer, interrupt_at_step)),
                   params_factory=SamplingParams, is_main=False)
    kept = by_key(shard_rows(tmp_path / "out"))
    done = {key for key, _ in kept}
    assert 0 < len(done) < len(ROWS) and len(kept) == N * len(done)   # whole rows only
    summary = run_recipe(recipe, FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)
    assert summary.already_done == len(done) and summary.rows_written == N * (len(ROWS) - len(done))
    got, want = by_key(shard_rows(tmp_path / "out")), expected(tokenizer)
    assert sorted(got) == sorted(want)
    assert all(got[k]["completion_token_ids"] == want[k][0] for k in want)


def test_a_shard_holding_part_of_a_row_is_refused(tmp_path, tokenizer):
    run_recipe(recipe_n(tmp_path), FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)
    directory = str(tmp_path / "out")
    path = existing_shards(directory)[0][2]
    table = pq.read_table(path)
    pq.write_table(table.slice(0, len(table) - 1), path)    # a row with 2 of its 3 samples
    with pytest.raises(OutputError, match=r"holds row id 'k\d\d' with sample_index \[0, 1\], not samples 0\.\.2"):
        read_completed_ids(directory, N)
    assert len(read_completed_ids(directory, 1)) == len(ROWS)


def test_flush_never_splits_a_row(tmp_path):
    writer = ShardWriter(str(tmp_path), 0, output_schema(False, sample_index=True), samples_per_row=3)
    for i in range(7):
        for s in range(3):
            writer.add({"id": f"r{i}", "sample_index": s, "row_index": i})
    assert len(pq.read_table(writer.flush(4))) == 6 and len(pq.read_table(writer.flush(1))) == 3
    writer.rows.append({"id": "x", "sample_index": 0, "row_index": 9})
    with pytest.raises(OutputError, match="not whole units of 3 samples"):
        writer.flush()


# ---- fingerprint ---------------------------------------------------------------------------------------------
def test_changing_n_into_the_same_folder_is_refused(tmp_path, tokenizer):
    run_recipe(recipe_n(tmp_path, n=2), FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)
    manifest = json.load(open(tmp_path / "out" / MANIFEST_NAME))
    assert manifest["fingerprint"]["sampling.n"] == 2
    with pytest.raises(OutputError, match="sampling.n changed from 2 to 3; use a new output.dir"):
        run_recipe(recipe_n(tmp_path, n=3), FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)


def test_a_folder_from_before_sampling_n_resumes_with_n_1_only(tmp_path, tokenizer):
    run_recipe(recipe_n(tmp_path, n=1, data={"limit": 5}), FakeLLM(tokenizer, ReversingEngine(tokenizer, 3)),
               params_factory=SamplingParams, is_main=False)
    path = tmp_path / "out" / MANIFEST_NAME
    manifest = json.load(open(path))
    del manifest["fingerprint"]["sampling.n"]         # as written before the key existed
    path.write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match="sampling.n changed from 1 to 3"):
        run_recipe(recipe_n(tmp_path, n=3, data={"limit": 5}), FakeLLM(tokenizer), params_factory=SamplingParams,
                   is_main=False)
    summary = run_recipe(recipe_n(tmp_path, n=1, data={"limit": 5}), FakeLLM(tokenizer, ReversingEngine(tokenizer)),
                         params_factory=SamplingParams, is_main=False)
    assert summary.already_done == 5 and summary.rows_written == 0
    assert os.path.exists(path)
