"""PP2 -> TP2 on the embedded SmolLM2 (9 query heads, 3 KV heads: AutoTP splits them unevenly, 6q/2kv and
3q/1kv) gives Hugging Face `generate`'s greedy tokens."""
import pytest
import torch

from seesaw_ds import SamplingParams
from tests.conftest import hf_greedy
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


def _generate(rank, prompts):
    from seesaw_ds import LLM
    llm = LLM("embedded:smollm2", dtype="float32", parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}},
              kv_device_gb=0.05, kv_host_gb=0.02, block_size=16, max_model_len=400)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    decode = llm.engine.runtimes["decode"]
    with llm:
        return {"bound": decode.executor.bound_bytes, "tokens": [o.token_ids for o in outs],
                "kv_heads": [decode.rect.heads.start, decode.rect.heads.stop], "folder": llm.model_folder,
                "switches": [[s["from"], s["to"]] for s in llm.engine.stats.switches]}


def test_embedded_pp2_to_tp2_matches_hf(tmp_path):
    from transformers import AutoModelForCausalLM
    from seesaw_ds.models.loader import resolve_model_folder
    folder = resolve_model_folder("embedded:smollm2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (7, 300, 64, 180, 25)]
    out = run_ranks(2, _generate, prompts, out_dir=str(tmp_path))
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p, tokens in zip(prompts, out["tokens"]):
        assert tokens == hf_greedy(ref, p, MAX_TOKENS)
    assert out["kv_heads"] == [0, 2]          # rank 0 holds KV heads 0-1 of 3 (uneven split)
    assert ["decode", "prefill"] in out["switches"]    # the small host store forces a prefill -> decode ->
    assert out["switches"][0] == ["prefill", "decode"]  # prefill cycle; only real switches are recorded
    assert out["bound"] > 0                   # AutoTP shards now alias the master copy
