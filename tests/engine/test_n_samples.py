"""n samples of one request share its prefill: each sample equals an independent request seeded with the
derived seed, token for token; the prompt's KV blocks are held once; per-token logprobs of the sampled tokens
equal a Hugging Face forward of the whole sequence (fp32)."""
import copy
import random

import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from seesaw_ds.engine.sampling_params import sample_seed
from seesaw_ds.kv.allocator import BlockAllocator, BlockAllocatorError
from tests.conftest import tiny_hf_model

# block_size 8: 16 ends on a block boundary (nothing to copy at the fork), 21 and 5 inside a block
LENGTHS = [21, 16, 5]


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in lengths]


def hf_token_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The trainer's view: log_softmax of a full-sequence forward, gathered at each sampled token."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def generate_groups_and_singles(llm, prompts, n, seed, max_tokens):
    """(n-sample outputs, the matching independent requests' outputs, peak blocks of each run)."""
    params = SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0)
    stats = llm.engine.stats
    stats.device_blocks_peak = 0
    grouped = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    peak_grouped, stats.device_blocks_peak = stats.device_blocks_peak, 0
    singles = llm.generate([{"prompt_token_ids": p} for p in prompts for _ in range(n)],
                           [params.for_sample(i) for _ in prompts for i in range(n)], use_tqdm=False)
    return grouped, singles, peak_grouped, stats.device_blocks_peak


@pytest.fixture(scope="module")
def ref():
    return tiny_hf_model("llama")


def test_n_samples_equal_independent_seeded_requests(ref):
    llm = LLM.from_hf(copy.deepcopy(ref), block_size=8)
    prompts = _prompts(LENGTHS)
    grouped, singles, peak_grouped, peak_singles = generate_groups_and_singles(llm, prompts, 8, 1234, 12)
    for k, out in enumerate(grouped):
        assert [s.index for s in out.samples] == list(range(8))
        assert out.token_ids == out.samples[0].token_ids
        for i, sample in enumerate(out.samples):
            assert sample.token_ids == singles[k * 8 + i].token_ids, (k, i)
            assert sample.finish_reason == "length" and len(sample.token_logprobs) == 12
        assert len({tuple(s.token_ids) for s in out.samples}) > 1       # temperature 1: samples differ
    # the prompt's full blocks are held once: 3 prompts x 8 samples with 12 tokens each
    assert peak_grouped < peak_singles, (peak_grouped, peak_singles)
    alloc = llm.engine.scheduler.allocator
    alloc.check_integrity()
    assert alloc.num_used == 0


def test_logprobs_of_sampled_tokens_equal_a_full_forward(ref):
    llm = LLM.from_hf(copy.deepcopy(ref), block_size=8)
    prompts = _prompts(LENGTHS, seed=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        for sample in out.samples:
            expected = hf_token_logprobs(ref, prompt, sample.token_ids)
            worst = max(worst, (torch.tensor(sample.token_logprobs) - expected).abs().max().item())
    assert worst <= 1e-5, worst


def test_forks_wait_for_room_and_preempted_samples_keep_their_tokens(ref):
    # a pool of 14 blocks of 8 tokens for 2 prompts x 6 samples of up to 60 tokens: forks wait for blocks,
    # samples are preempted and recomputed; shared blocks survive a sibling's preemption
    llm = LLM.from_hf(copy.deepcopy(ref), block_size=8, max_model_len=64,
                      kv_device_gb=14 * 8 * 2 * 3 * 2 * 16 * 4 / (1 << 30))
    assert llm.engine.scheduler.allocator.num_blocks == 14
    prompts = _prompts([27, 20], seed=2)
    grouped, singles, _, _ = generate_groups_and_singles(llm, prompts, 6, 99, 30)
    for k, out in enumerate(grouped):
        for i, sample in enumerate(out.samples):
            assert sample.token_ids == singles[k * 6 + i].token_ids, (k, i)
    assert llm.engine.scheduler.num_preemptions > 0
    alloc = llm.engine.scheduler.allocator
    alloc.check_integrity()
    assert alloc.num_used == 0


def test_first_token_finish_and_abort(ref):
    llm = LLM.from_hf(copy.deepcopy(ref), block_size=8)
    (out,) = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(n=3, max_tokens=1, temperature=1.0,
                                                                         seed=0), use_tqdm=False)
    assert [len(s.token_ids) for s in out.samples] == [1, 1, 1]
    engine = llm.engine
    engine.add_request("a", list(range(2, 30)), SamplingParams(n=4, max_tokens=20, temperature=1.0))
    engine.step()                                   # prefill: samples 1..3 wait to fork
    engine.step()                                   # first decode: they forked
    aborted = engine.abort("a")
    assert [s.finish_reason for s in aborted.samples] == ["abort"] * 4
    assert not engine.has_unfinished()
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.num_used == 0


def test_sample_seed_keeps_sample_zero_and_spreads_the_rest():
    assert sample_seed(7, 0) == 7 and sample_seed(None, 3) is None
    assert len({sample_seed(7, i) for i in range(64)}) == 64
    assert SamplingParams(n=4, seed=7).for_sample(2) == SamplingParams(seed=sample_seed(7, 2))
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


def test_allocator_reference_counts():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    alloc.share(a[:2])
    alloc.share(a[:1])
    assert [alloc.ref_count(b) for b in a] == [3, 2, 1]
    alloc.free(a)
    assert alloc.num_used == 2 and alloc.num_free == 6
    alloc.free(a[:2])
    alloc.free(a[:1])
    assert alloc.num_used == 0
    with pytest.raises(BlockAllocatorError, match="not allocated"):
        alloc.share([a[0]])
    alloc.check_integrity()


def test_allocator_random_sharing_keeps_invariants():
    rng = random.Random(0)
    alloc = BlockAllocator(48)
    held: list[list[int]] = []
    for _ in range(2000):
        r = rng.random()
        if held and r < 0.4:
            alloc.free(held.pop(rng.randrange(len(held))))
        elif held and r < 0.6:
            src = held[rng.randrange(len(held))]
            part = src[:rng.randint(0, len(src))]
            alloc.share(part)
            held.append(part)
        else:
            n = rng.randint(0, 6)
            if alloc.can_allocate(n):
                held.append(alloc.allocate(n))
        alloc.check_integrity()
        owned = [b for blocks in held for b in blocks]
        assert len(set(owned)) == alloc.num_used
        assert all(alloc.ref_count(b) == owned.count(b) for b in set(owned))
    for blocks in held:
        alloc.free(blocks)
    assert alloc.num_free == 48
