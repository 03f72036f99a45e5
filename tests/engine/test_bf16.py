"""bf16 on the CPU kernels (paged decode, AVX512-BF16 prefill) stays close to Hugging Face generate in bf16.

Reduction order differs between any two bf16 implementations, so exact equality is not expected. Two rules:
  * as in vLLM's check_logprobs_close: at the first divergence from HF bf16, each side's token is among the
    other side's top-5 candidates;
  * against the fp32 reference, our bf16 tokens agree for (nearly) as long as transformers' own bf16 does.
"""
import copy

import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from seesaw_ds.kv.native import paged_decode_op, prefill_attention_op
from tests.conftest import tiny_hf_model

TOP_N = 5


def _hf_steps(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [s[0].float() for s in out.scores]


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_bf16_greedy_close_to_hf_bf16():
    if paged_decode_op() is None:
        pytest.skip("the native kernels cannot be built here")
    # head_dim 64: the shape the kernels' vector paths serve (SmolLM2, Llama); 600 tokens spans many blocks
    shape = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, intermediate_size=512)
    ref32 = tiny_hf_model("llama", **shape)
    ref = copy.deepcopy(ref32).to(torch.bfloat16)
    llm = LLM.from_hf(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in (1, 17, 64, 300, 450)]
    n = 16
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=n, ignore_eos=True, logprobs=TOP_N), use_tqdm=False)
    ours_vs_fp32 = hf_vs_fp32 = 0
    for prompt, out in zip(prompts, outs):
        hf_tokens, hf_scores = _hf_steps(ref, prompt, n)
        fp32_tokens, _ = _hf_steps(ref32, prompt, n)
        ours_vs_fp32 += _agree(out.token_ids, fp32_tokens)
        hf_vs_fp32 += _agree(hf_tokens, fp32_tokens)
        diverged = _agree(out.token_ids, hf_tokens)
        if diverged == n:
            continue
        hf_top = torch.topk(hf_scores[diverged], TOP_N).indices.tolist()
        assert out.token_ids[diverged] in hf_top, f"{len(prompt)}-token prompt: token {diverged} not in HF top-5"
        assert hf_tokens[diverged] in out.logprobs[diverged], f"{len(prompt)}-token prompt: HF token not in ours"
    assert ours_vs_fp32 >= 0.8 * hf_vs_fp32, (ours_vs_fp32, hf_vs_fp32)
    if prefill_attention_op() is None:
        pytest.skip("checked decode only: the bf16 prefill kernel needs AVX512-BF16")
