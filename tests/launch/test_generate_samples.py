"""`sampling.n` through launch/generate.py's CLI (in this process, as in test_bad_inputs.py) on the real engine:
every (id, sample_index) row once, each equal to `LLM.generate` with SamplingParams(n=3, seed=the row's seed)
and to an independent n=1 request with the documented per-sample seed; a folder left by a job killed after
its first shard resumes to the same rows; greedy with n > 1 is refused with one error line."""
import glob
import json
import os
import shutil

import pyarrow.parquet as pq

from seesaw_ds.engine.sampling_params import sample_seed
from seesaw_ds.jobs.generate import main
from seesaw_ds.jobs.recipe import load_recipe
from seesaw_ds.jobs.runner import row_seed
from tests.launch.conftest import TEMPLATE, article_rows, recipe_dict, write_recipe
from tests.launch.test_bad_inputs import _one_rank, error_of  # noqa: F401 - the fixture: one process

ROWS, N, SEED, MAX_TOKENS = 6, 3, 5, 8


def rows_by_key(out_dir):
    rows = [r for path in sorted(glob.glob(f"{out_dir}/part-*.parquet")) for r in pq.read_table(path).to_pylist()]
    keyed = {(r["id"], r["sample_index"]): r for r in rows}
    assert len(keyed) == len(rows), "an (id, sample_index) written twice"
    return keyed


def reference_samples(recipe, tokenizer):
    """(id, sample_index) -> token ids, from LLM.generate with n=3 and from n=1 requests with the sample seeds."""
    from seesaw_ds import LLM, SamplingParams
    llm = LLM(config=recipe.engine_config(), distributed=False)
    rows = article_rows(ROWS)
    prompts = [tokenizer(TEMPLATE.format(article=r["article"]))["input_ids"] for r in rows]
    common = dict(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True)
    grouped = llm.generate(prompts, [SamplingParams(n=N, seed=row_seed(SEED, r["id"]), **common) for r in rows],
                           use_tqdm=False)
    singles = llm.generate([p for p in prompts for _ in range(N)],
                           [SamplingParams(seed=sample_seed(row_seed(SEED, r["id"]), i), **common)
                            for r in rows for i in range(N)], use_tqdm=False)
    llm.close()
    by_group = {(r["id"], s.index): s.token_ids for r, out in zip(rows, grouped) for s in out.samples}
    by_single = {(r["id"], i): singles[k * N + i].token_ids for k, r in enumerate(rows) for i in range(N)}
    return by_group, by_single


def test_n_samples_match_llm_generate_and_resume_exactly(capsys, tmp_path, tiny_model, articles):
    raw = recipe_dict(tiny_model[0], articles, str(tmp_path / "out"),
                      sampling={"temperature": 0.8, "seed": SEED, "n": N, "max_tokens": MAX_TOKENS,
                                "ignore_eos": True},
                      data={"limit": ROWS}, output={"shard_rows": 4})     # 4 rounds up to 6: 2 inputs a shard
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["--config", path]) == 0
    assert "6 inputs x 3 samples" in capsys.readouterr().out
    rows = rows_by_key(tmp_path / "out")
    assert sorted(rows) == sorted((r["id"], i) for r in article_rows(ROWS) for i in range(N))

    by_group, by_single = reference_samples(load_recipe(path), tiny_model[2])
    assert by_group == by_single        # the documented seed rule: sample i = n=1 with sample_seed(row seed, i)
    for key, row in rows.items():
        assert row["completion_token_ids"] == by_group[key], key
        assert row["seed"] == sample_seed(row_seed(SEED, key[0]), key[1])
    assert len({tuple(rows[("doc000", i)]["completion_token_ids"]) for i in range(N)}) > 1

    # what a job killed after its first shard leaves: the manifest and that shard
    shards = sorted(glob.glob(str(tmp_path / "out" / "part-*.parquet")))
    assert len(shards) == ROWS // 2
    os.makedirs(tmp_path / "killed")
    for name in ("manifest.json", os.path.basename(shards[0])):
        shutil.copy(tmp_path / "out" / name, tmp_path / "killed" / name)
    assert main(["--config", path, f"output.dir={tmp_path / 'killed'}"]) == 0
    capsys.readouterr()
    total = json.load(open(tmp_path / "killed" / "job_summary.json"))["total"]
    assert total["already_done"] == 2 and total["rows_written"] == (ROWS - 2) * N
    resumed = rows_by_key(tmp_path / "killed")
    assert sorted(resumed) == sorted(rows)
    assert all(resumed[k]["completion_token_ids"] == rows[k]["completion_token_ids"] for k in rows)


def test_greedy_with_n_above_one_is_refused(capsys, tmp_path, tiny_model, articles):
    raw = recipe_dict(tiny_model[0], articles, str(tmp_path / "out"))
    line = error_of(capsys, ["--config", write_recipe(tmp_path / "r.yaml", raw), "sampling.n=3"])
    assert "sampling.n must be 1 with greedy decoding" in line
    assert not os.path.exists(tmp_path / "out")
