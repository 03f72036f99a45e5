"""A tiny random Llama folder with a one-char-per-token tokenizer, a jsonl of articles, and recipe files."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from seesaw_ds.distributed.node import free_port
from tests.conftest import hf_greedy
from tests.jobs.tiny_tokenizer import char_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATE = os.path.join(REPO, "launch", "generate.py")
NUM_ROWS = 40
MAX_TOKENS = 8
TEMPLATE = "Summarize: {article}"


def article_rows(n=NUM_ROWS):
    return [{"id": f"doc{i:03d}", "article": f"article {i}: " + "lorem ipsum dolor " * (1 + i % 6),
             "abstract": f"article {i} is about lorem ipsum"} for i in range(n)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(folder, model, tokenizer): 2 layers, 4 query / 2 KV heads, fp32, peaked logits (no greedy near-ties)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.08, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="session")
def articles(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "articles.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in article_rows():
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def reference_rows(tiny_model):
    """The trusted answer per row id: prompt ids from the tokenizer, completion from HF greedy generate."""
    import torch
    torch.set_num_threads(1)
    _, model, tokenizer = tiny_model
    out = {}
    for row in article_rows():
        ids = tokenizer(TEMPLATE.format(article=row["article"]))["input_ids"]
        out[row["id"]] = {"prompt_token_ids": ids, "completion_token_ids": hf_greedy(model, ids, MAX_TOKENS),
                          "abstract": row["abstract"]}
    return out


def recipe_dict(model_dir, data_path, out_dir, **sections):
    """Small KV budgets so PP2 -> TP2 runs switch stages several times."""
    raw = {"model": {"name": model_dir, "dtype": "float32"},
           "data": {"source": data_path, "columns": {"id": "id", "carry": ["abstract"]}, "template": TEMPLATE},
           "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
           "engine": {"max_model_len": 256, "max_num_seqs": 4, "kv": {"device_gb": 0.0005, "host_gb": 0.0005}},
           "parallel": "seesaw", "output": {"dir": out_dir, "shard_rows": 4}}
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def write_recipe(path, raw):
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(raw, handle)
    return str(path)


def job_env(tmp_path, **extra):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def deepspeed_command(num_ranks, port, recipe_path, *overrides, rank_logs=None):
    """rank_logs: a folder where each rank's stdout + stderr go (`*_rank{r}.log`) instead of the launcher's."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    per_rank = ["--enable_each_rank_log", str(rank_logs)] if rank_logs else []
    return [launcher if os.path.exists(launcher) else "deepspeed", "--num_gpus", str(num_ranks),
            "--master_port", str(port), *per_rank, GENERATE, "--config", recipe_path, *overrides]


def rank_log(rank_logs, rank):
    [path] = glob.glob(os.path.join(str(rank_logs), f"*_rank{rank}.log"))
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


# one refresh of the job's tqdm bar: " 50%|█████     | 20/40 [00:51<00:51, 2.57s/row, stage=decode, tok_s=35]"
JOB_BAR = re.compile(r"(\d+)/(\d+) \[[^\]\n]*?, stage=([\w-]+), tok_s=(\d+)\]")


def job_bars(text):
    """(rows done, rows total, stage, tokens/s) of every refresh of the job's progress bar in `text`."""
    return [(int(done), int(total), stage, int(rate)) for done, total, stage, rate in JOB_BAR.findall(text)]


def run_checked(cmd, env, timeout=600, **kwargs):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
