"""The job loop against a deterministic fake engine (reference: reversed prompt ids) and the real engine
(reference: Hugging Face greedy generate)."""
import os

import pytest

from seesaw_ds.jobs.inputs import open_inputs
from seesaw_ds.jobs.job import run_recipe
from seesaw_ds.jobs.outputs import (ShardWriter, existing_shards, job_fingerprint, load_output, output_schema,
                                    prepare_output_dir)
from seesaw_ds.jobs.recipe import parse_recipe
from seesaw_ds.jobs.runner import row_seed, run_job
from tests.jobs.conftest import write_jsonl
from tests.jobs.fake_engine import ReversingEngine, reversed_completion

SamplingParams = pytest.importorskip("seesaw_ds").SamplingParams

ROWS = [{"key": f"k{i:02d}", "text": f"row {i} says " + "xyz" * (i % 5), "n": 1 + i % 6, "ref": i} for i in range(23)]


class FakeLLM:
    def __init__(self, tokenizer, max_num_seqs=3):
        self.tokenizer = tokenizer
        self.engine = ReversingEngine(tokenizer, max_num_seqs=max_num_seqs)


def job_recipe(tmp_path, rows=ROWS, **extra):
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    raw = {"data": {"source": path, "columns": {"prompt": "text", "id": "key", "max_tokens": "n", "carry": ["ref"]}},
           "output": {"dir": str(tmp_path / "out"), "shard_rows": 5}, "engine": {"request_window": 4},
           "sampling": {"seed": 7, "temperature": 0.5}}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw)


def expected_rows(tokenizer, rows=ROWS):
    out = {}
    for r in rows:
        ids = tokenizer(r["text"])["input_ids"]
        completion, reason = reversed_completion(ids, r["n"])
        out[r["key"]] = {"prompt": r["text"], "completion": tokenizer.decode(completion), "finish_reason": reason,
                         "completion_token_ids": completion, "prompt_tokens": len(ids), "ref": r["ref"],
                         "max_tokens": r["n"], "seed": row_seed(7, r["key"])}
    return out


def output_rows(directory, tmp_path):
    data = load_output(str(directory), cache_dir=str(tmp_path / "cache"))
    return {r["id"]: r for r in data.to_list()}


def test_every_row_once_with_the_reference_completion(tmp_path, tokenizer, capsys):
    recipe = job_recipe(tmp_path)
    llm = FakeLLM(tokenizer)
    summary = run_recipe(recipe, llm, params_factory=SamplingParams)
    got = output_rows(tmp_path / "out", tmp_path)
    want = expected_rows(tokenizer)
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        assert {k: got[key][k] for k in row} == row
        assert got[key]["temperature"] == 0.5 and got[key]["model"] == "embedded:smollm2"
    assert llm.engine.max_in_flight <= 4  # engine.request_window
    assert len(existing_shards(str(tmp_path / "out"))) == 5  # ceil(23 / 5)
    assert summary.rows_written == 23 and summary.completion_tokens == sum(
        len(w["completion_token_ids"]) for w in want.values())
    table = capsys.readouterr().out
    assert "rows written" in table and "tokens/s" in table and "requests/s" in table


class CrashingEngine(ReversingEngine):
    """Raises `error` (an interrupt by default) at its `crash_at_step`-th step; `finished` holds the ids of
    every request it finished before that."""

    def __init__(self, tokenizer, crash_at_step, error=KeyboardInterrupt):
        super().__init__(tokenizer, max_num_seqs=3)
        self.steps, self.crash_at_step, self.error = 0, crash_at_step, error
        self.finished = set()

    def step(self):
        self.steps += 1
        if self.steps == self.crash_at_step:
            raise self.error
        outputs = super().step()
        self.finished.update(o.request_id for o in outputs)
        return outputs


def test_resume_after_a_crash_and_skip_counts(tmp_path, tokenizer):
    rows = ROWS + [{"key": "empty", "text": "", "n": 2, "ref": -1}]
    recipe = job_recipe(tmp_path, rows=rows)
    crashing = FakeLLM(tokenizer)
    crashing.engine = CrashingEngine(tokenizer, crash_at_step=25)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, crashing, params_factory=SamplingParams, is_main=False)
    kept = output_rows(tmp_path / "out", tmp_path)
    assert set(kept) == crashing.engine.finished  # every finished row, the part shard too (flushed on the way out)
    written = len(kept)
    assert 0 < written < 23 and written % 5 != 0
    summary = run_recipe(recipe, FakeLLM(tokenizer), params_factory=SamplingParams, is_main=False)
    assert summary.already_done == written and summary.rows_written == 23 - written
    assert summary.skipped == {"empty prompt": 1}
    got = output_rows(tmp_path / "out", tmp_path)
    want = expected_rows(tokenizer)
    assert sorted(got) == sorted(want)
    assert all(got[k]["completion"] == want[k]["completion"] for k in want)


def test_an_engine_error_keeps_the_finished_rows(tmp_path, tokenizer):
    recipe = job_recipe(tmp_path)
    failing = FakeLLM(tokenizer)
    failing.engine = CrashingEngine(tokenizer, crash_at_step=9, error=RuntimeError("engine failed"))
    with pytest.raises(RuntimeError, match="engine failed"):
        run_recipe(recipe, failing, params_factory=SamplingParams, is_main=False)
    kept = output_rows(tmp_path / "out", tmp_path)
    assert set(kept) == failing.engine.finished and len(kept) % 5 != 0  # a part shard: written by finally
    want = expected_rows(tokenizer)
    assert all(kept[k]["completion"] == want[k]["completion"] for k in kept)


def test_two_replicas_write_every_row_once(tmp_path, tokenizer):
    recipe = job_recipe(tmp_path, parallel={"dp": 2})
    summaries = [run_recipe(recipe, FakeLLM(tokenizer), replica=r, params_factory=SamplingParams, is_main=r == 0)
                 for r in (1, 0)]
    assert sorted(s.rows_written for s in summaries) == [11, 12]
    names = {os.path.basename(p)[:9] for _, _, p in existing_shards(str(tmp_path / "out"))}
    assert names == {"part-r000", "part-r001"}
    got = output_rows(tmp_path / "out", tmp_path)
    assert len(got) == 23 and sorted(got) == sorted(expected_rows(tokenizer))


def test_time_based_flush(tmp_path, tokenizer):
    recipe = job_recipe(tmp_path, output={"shard_rows": 1000, "flush_seconds": 2.0})
    directory = prepare_output_dir(recipe.output, job_fingerprint(recipe, recipe.data.source), recipe)
    source = open_inputs(recipe, tokenizer)
    writer = ShardWriter(directory, 0, output_schema(True, source.carry_types()))
    ticks = iter(range(10_000))  # one second per clock read
    summary = run_job(recipe, source, ReversingEngine(tokenizer, 3), writer, params_factory=SamplingParams,
                      model_label="m", layouts_label="tp1", show_progress=False, clock=lambda: float(next(ticks)))
    assert summary.rows_written == 23 and summary.shards_written > 2  # flushed by time, not by size


def test_row_seed_is_stable_and_per_row():
    assert row_seed(None, "a") is None
    assert row_seed(3, "a") == row_seed(3, "a") != row_seed(3, "b") != row_seed(4, "b")
    assert 0 <= row_seed(3, "a") < 2 ** 31


def _tiny_llama_folder(folder, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.08, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_real_engine_matches_hf_greedy(tmp_path, tokenizer):
    import torch
    seesaw_ds = pytest.importorskip("seesaw_ds")
    if not hasattr(seesaw_ds, "LLM"):
        pytest.skip("seesaw_ds.LLM is not available")
    from tests.conftest import hf_greedy
    torch.set_num_threads(1)
    model = _tiny_llama_folder(str(tmp_path / "tiny"), tokenizer)
    rows = [{"key": f"k{i}", "text": f"the {i}th prompt " + "ab" * i} for i in range(6)]
    recipe = job_recipe(tmp_path, rows=rows, model={"name": str(tmp_path / "tiny"), "dtype": "float32"},
                        sampling={"temperature": 0.0, "max_tokens": 6, "ignore_eos": True, "seed": None, "logprobs": 2},
                        data={"columns": {"prompt": "text", "id": "key"}},
                        engine={"max_model_len": 256, "max_num_seqs": 4, "kv": {"device_gb": 0.01}})
    llm = seesaw_ds.LLM(config=recipe.engine_config())
    run_recipe(recipe, llm)
    got = output_rows(tmp_path / "out", tmp_path)
    for r in rows:
        ids = tokenizer(r["text"])["input_ids"]
        assert got[r["key"]]["prompt_token_ids"] == ids
        assert got[r["key"]]["completion_token_ids"] == hf_greedy(model, ids, 6), r["key"]
        assert got[r["key"]]["finish_reason"] == "length"
        steps = got[r["key"]]["logprobs"]  # per output token: the chosen one and the top 2
        chosen = got[r["key"]]["completion_token_ids"]
        assert len(steps) == 6 and all(
            {e["token_id"]: e["logprob"] for e in s}[t] == max(e["logprob"] for e in s) for s, t in zip(steps, chosen))
