import pytest

from seesaw_ds.data import BenchRequest, fixed_length_requests, random_token_prompts, total_tokens


def test_random_prompts_shape_range_and_seed():
    a = random_token_prompts(5, 7, vocab_size=50, seed=4, low=10)
    assert len(a) == 5 and all(len(p) == 7 for p in a)
    assert all(10 <= t < 50 for p in a for t in p)
    assert a == random_token_prompts(5, 7, vocab_size=50, seed=4, low=10)
    assert a != random_token_prompts(5, 7, vocab_size=50, seed=5, low=10)
    assert len({tuple(p) for p in a}) == 5


def test_fixed_length_requests_totals():
    reqs = fixed_length_requests(4, 128, 256, vocab_size=49152)
    assert total_tokens(reqs) == (4 * 128, 4 * 256)


def test_bench_request_validates_and_round_trips():
    with pytest.raises(ValueError, match="prompt_token_ids"):
        BenchRequest((), 3)
    with pytest.raises(ValueError, match="output_len"):
        BenchRequest((1, 2), 0)
    req = BenchRequest([3, 4], 5)
    assert req.prompt_token_ids == (3, 4)
    assert BenchRequest.from_json(req.to_json()) == req
