import copy

import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from seesaw_ds.engine.sampler import _filter_top_k_top_p
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def llm():
    return LLM.from_hf(tiny_hf_model("llama", initializer_range=0.02))


PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(10, 60))}]


def _gen(llm, **kw):
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, **kw),
                                              use_tqdm=False)]


def test_same_seed_same_tokens_different_seed_different_tokens(llm):
    a = _gen(llm, temperature=1.0, seed=7)
    assert a == _gen(llm, temperature=1.0, seed=7)
    assert a != _gen(llm, temperature=1.0, seed=8)


def test_seeded_tokens_do_not_depend_on_batch_companions(llm):
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, seed=11)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].token_ids
    batched = llm.generate(PROMPTS[::-1], params, use_tqdm=False)[0].token_ids
    assert alone == batched


def test_top_k_one_is_greedy(llm):
    assert _gen(llm, temperature=0.9, top_k=1, seed=3) == _gen(llm)


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_filter_top_k_top_p(logits, -1, 0.75))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(_filter_top_k_top_p(logits, 3, 1.0))
    assert kept.tolist() == [True, True, True, False]


def test_logprobs_are_log_softmax_of_the_reference_logits():
    ref = tiny_hf_model("llama")
    llm = LLM.from_hf(copy.deepcopy(ref))
    prompt = [4, 9, 13, 2, 77]
    (out,) = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=3, logprobs=2), use_tqdm=False)
    assert len(out.logprobs) == len(out.token_ids)
    with torch.inference_mode():
        expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert out.token_ids[0] in first and len(first) <= 3
    for tok, lp in first.items():
        assert lp == pytest.approx(float(expected[tok]), abs=1e-4)


def test_stop_token_ids_end_generation(llm):
    free = _gen(llm)[0]
    stop = free[5]
    (out,) = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, stop_token_ids=[stop]), use_tqdm=False)
    assert out.token_ids == free[:free.index(stop) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("kw, field", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                       (dict(top_k=0), "top_k"), (dict(max_tokens=0), "max_tokens")])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
