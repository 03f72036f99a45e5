"""Greedy tokens from the paged, continuously batched engine equal Hugging Face `generate` (fp32)."""
import copy
import random

import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model

MIXED_LENGTHS = [1, 2, 7, 16, 17, 63, 130, 257, 600]


def _prompts(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _check(kind, lengths, max_tokens=12, llm_kwargs=None, **model_kw):
    ref = tiny_hf_model(kind, **model_kw)
    llm = LLM.from_hf(copy.deepcopy(ref), **(llm_kwargs or {}))
    prompts = _prompts(ref.config.vocab_size, lengths)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, p, max_tokens), f"prompt of {len(p)} tokens diverged"
        assert out.finish_reason == "length"
    llm.engine.scheduler.allocator.check_integrity()
    assert llm.engine.scheduler.allocator.num_used == 0
    return llm


def test_llama_gqa_mixed_lengths():
    _check("llama", MIXED_LENGTHS)


def test_qwen2_qkv_bias():
    model = tiny_hf_model("qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    _check("qwen2", [3, 40, 200, 333])


def test_mistral_sliding_window_shorter_than_prompt():
    _check("mistral", [20, 50, 90], max_tokens=16, sliding_window=32)


def test_tied_embeddings_and_odd_heads():
    _check("llama", [5, 77], tie_word_embeddings=True, num_attention_heads=9, num_key_value_heads=3,
           hidden_size=72 * 2, head_dim=16)


def test_more_sequences_than_the_pool_holds():
    # 24 sequences of up to 150 tokens + 20 new ones vs a pool of ~600 tokens: most must wait, some are
    # preempted and recomputed; every output still equals the reference.
    rng = random.Random(3)
    lengths = [rng.randint(1, 150) for _ in range(24)]
    llm = _check("llama", lengths, max_tokens=20,
                 llm_kwargs=dict(kv_device_gb=600 * 2 * 3 * 2 * 16 * 4 / (1 << 30), block_size=8,
                                 max_num_batched_tokens=256, max_model_len=200))
    stats = llm.engine.stats
    assert llm.engine.scheduler.allocator.num_blocks * 8 < sum(lengths) + 24 * 20
    assert stats.prefill_steps > 1 and max(stats.decode_batch_sizes) > 1


def test_chat_and_text_prompts_round_trip_through_a_tokenizer():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(320)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", bos_token="w0", unk_token="w2")
    hf_tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    ref = tiny_hf_model("llama")
    llm = LLM.from_hf(copy.deepcopy(ref), tokenizer=hf_tok)
    text = "w5 w9 w33 w7"
    (out,) = llm.generate(text, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == hf_greedy(ref, hf_tok.encode(text), 6)
    assert out.text == hf_tok.decode(out.token_ids, skip_special_tokens=True) and out.prompt == text
    (chat,) = llm.generate([[{"role": "w3", "content": "w5 w6"}]], SamplingParams(max_tokens=4),
                           use_tqdm=False)
    assert chat.prompt_token_ids == hf_tok.encode("w3 w5 w6")
