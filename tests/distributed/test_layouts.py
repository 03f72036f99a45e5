"""Greedy tokens equal Hugging Face `generate` (fp32) under every parallel layout, with KV budgets far
smaller than the workload (several prefill -> decode -> prefill cycles, waiting and onboarding)."""
import pytest
import torch

from seesaw_ds import SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model
from tests.distributed.harness import run_ranks

LENGTHS = [5, 40, 17, 90, 3, 60, 33, 120, 1, 75, 8, 50]
MAX_TOKENS = 10


def _generate(rank, folder, parallel, kv_host_gb, kv_device_gb):
    from seesaw_ds.distributed.builder import build_engine
    engine = build_engine(folder, dtype="float32", parallel=parallel, kv_host_gb=kv_host_gb,
                          kv_device_gb=kv_device_gb, block_size=8, max_num_batched_tokens=256,
                          max_model_len=160)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = o.token_ids
    stats = engine.stats
    return {"tokens": [out[str(i)] for i in range(len(prompts))], "prompts": prompts,
            "switches": [s["to"] for s in stats.switches], "kv_bytes": stats.kv_bytes_moved,
            "prefetched": stats.prefetched_seqs,
            "layouts": [engine.layouts.prefill.describe(), engine.layouts.decode.describe()]}


def _bytes_for_tokens(model, tokens: int) -> float:
    c = model.config
    return tokens * 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4 / (1 << 30)


CASES = {   # name: (world, parallel spec, model overrides)
    "one-rank": (1, None, {}),
    "tp2": (2, {"tp": 2}, {}),
    "pp2": (2, {"pp": 2}, {}),
    "pp2-tp2": (2, {"prefill": {"pp": 2}, "decode": {"tp": 2}}, {}),
    "pp3-tp3-odd-layers": (3, {"prefill": {"pp": 3}, "decode": {"tp": 3}},
                           dict(num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_hf_generate(case, tmp_path):
    world, parallel, overrides = CASES[case]
    model = tiny_hf_model("llama", **overrides)
    model.save_pretrained(tmp_path / "model")
    host_gb = _bytes_for_tokens(model, 160)          # ~1/4 of the workload's prompt KV
    device_gb = _bytes_for_tokens(model, 200)
    out = run_ranks(world, _generate, str(tmp_path / "model"), parallel, host_gb, device_gb,
                    out_dir=str(tmp_path))
    for prompt, tokens in zip(out["prompts"], out["tokens"]):
        assert tokens == hf_greedy(model, prompt, MAX_TOKENS), f"{case}: prompt of {len(prompt)} diverged"
    # at least two prefill -> decode -> prefill cycles
    assert out["switches"].count("decode") >= 2 and out["switches"].count("prefill") >= 2, out["switches"]
    assert out["kv_bytes"] > 0
    assert out["prefetched"] > 0             # some sequences were onboarded in the background


def test_budget_that_cannot_hold_one_sequence_is_refused_with_numbers(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "model")

    def build(rank, folder):
        from seesaw_ds.distributed.builder import build_engine
        try:
            build_engine(folder, dtype="float32", kv_host_gb=_bytes_for_tokens(model, 100), max_model_len=512)
        except ValueError as e:
            return {"error": str(e)}
        return {"error": None}

    out = run_ranks(1, build, str(tmp_path / "model"), out_dir=str(tmp_path))
    assert out["error"] and "kv.host_gb" in out["error"] and "max_model_len=512" in out["error"]
