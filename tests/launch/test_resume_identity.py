"""A job folder resumes only onto the same weights: a checkpoint overwritten in place refuses the rerun into the
old folder (one line naming the model, exit 2), and a new folder gets the new weights' tokens (HF greedy).
The CLI runs in this process, as in test_bad_inputs.py."""
import glob
import json
import shutil

import pyarrow.parquet as pq
import torch

from seesaw_ds.jobs.generate import main
from tests.conftest import hf_greedy
from tests.launch.conftest import MAX_TOKENS, TEMPLATE, article_rows, recipe_dict, write_recipe
from tests.launch.test_bad_inputs import _one_rank, error_of  # noqa: F401 - the fixture: one process

ROWS = 4


def completions(out_dir):
    table = pq.read_table(sorted(glob.glob(f"{out_dir}/part-*.parquet")), columns=["id", "completion_token_ids"])
    return dict(zip(table.column("id").to_pylist(), table.column("completion_token_ids").to_pylist()))


def overwrite_weights_in_place(folder):
    from safetensors.torch import load_file, save_file
    path = f"{folder}/model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def test_weights_overwritten_in_place(capsys, tmp_path, tiny_model, articles):
    from transformers import LlamaForCausalLM
    folder = tmp_path / "model"
    shutil.copytree(tiny_model[0], folder)
    raw = recipe_dict(str(folder), articles, str(tmp_path / "out"), model={"cache_dir": str(tmp_path / "cache")})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert main(["--config", recipe, f"data.limit={ROWS}"]) == 0
    capsys.readouterr()
    before = completions(tmp_path / "out")

    overwrite_weights_in_place(folder)
    line = error_of(capsys, ["--config", recipe, f"data.limit={ROWS}"])
    assert f"the model's weights at {folder} changed since these rows were made" in line
    assert "model.content" in line and completions(tmp_path / "out") == before

    assert main(["--config", recipe, f"data.limit={ROWS}", f"output.dir={tmp_path / 'out2'}"]) == 0
    capsys.readouterr()
    after = completions(tmp_path / "out2")
    new_model = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = tiny_model[2]
    for row in article_rows(ROWS):
        ids = tokenizer(TEMPLATE.format(article=row["article"]))["input_ids"]
        assert after[row["id"]] == hf_greedy(new_model, ids, MAX_TOKENS), row["id"]
    assert after != before
    manifest = json.load(open(tmp_path / "out2" / "manifest.json"))
    assert manifest["fingerprint"]["model.content"].startswith("checkpoint ")
