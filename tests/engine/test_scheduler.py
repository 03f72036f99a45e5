"""The scheduler alone, driven with hand-built model outputs: no model, no tensors."""
import random

import pytest

from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import RequestRejected, Scheduler, SchedulerConfig
from seesaw_ds.engine.sequence import Sequence


def run_to_completion(sched: Scheduler, rng: random.Random, eos: int | None = None):
    finished, steps = [], 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch is not None, "scheduler stalled with unfinished work"
        if batch.is_prefill:
            assert len(batch.seqs) == 1 or batch.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for seq in batch.seqs:    # every scheduled sequence has blocks for all its tokens
            assert len(seq.block_table) == seq.blocks_needed(sched.config.block_size)
        sched.allocator.check_integrity()
        tokens = [eos if eos is not None and rng.random() < 0.05 else rng.randint(2, 99) for _ in batch.seqs]
        finished += sched.postprocess(batch, tokens)
        steps += 1
        assert steps < 100_000
    return finished


def test_every_request_finishes_once_with_a_small_pool():
    rng = random.Random(1)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4)
    sched = Scheduler(cfg, num_blocks=40)          # far fewer blocks than the workload: forces waiting
    seqs = [Sequence(f"r{i}", [1] * rng.randint(1, 60), SamplingParams(max_tokens=rng.randint(1, 40)))
            for i in range(50)]
    for s in seqs:
        sched.add(s)
    finished = run_to_completion(sched, rng)
    assert sorted(s.request_id for s in finished) == sorted(s.request_id for s in seqs)
    for s in finished:
        assert len(s.output_token_ids) == s.params.max_tokens and s.finish_reason == "length"
    assert sched.allocator.num_free == 40
    assert sched.num_preemptions > 0               # the pool was small enough to force recompute


def test_eos_stops_unless_ignored():
    rng = random.Random(2)
    sched = Scheduler(SchedulerConfig(block_size=4), num_blocks=256)
    a = Sequence("a", [5, 6], SamplingParams(max_tokens=500), eos_token_ids=(1,))
    b = Sequence("b", [5, 6], SamplingParams(max_tokens=30, ignore_eos=True), eos_token_ids=(1,))
    sched.add(a)
    sched.add(b)
    done = {s.request_id: s for s in run_to_completion(sched, rng, eos=1)}
    assert done["a"].finish_reason == "stop" and done["a"].output_token_ids[-1] == 1
    assert done["b"].finish_reason == "length" and len(done["b"].output_token_ids) == 30


def test_max_model_len_caps_generation():
    sched = Scheduler(SchedulerConfig(max_model_len=20, block_size=4), num_blocks=16)
    s = Sequence("a", [3] * 15, SamplingParams(max_tokens=100), max_model_len=20)
    sched.add(s)
    (done,) = run_to_completion(sched, random.Random(0))
    assert done.num_tokens == 20 and done.finish_reason == "length"


@pytest.mark.parametrize("prompt_len, max_tokens, match", [
    (0, 4, "empty prompt"),
    (64, 4, "leaves no room"),
    (40, 20, "need 15 KV blocks; the pool has 8"),
])
def test_requests_that_can_never_fit_are_rejected_at_admission(prompt_len, max_tokens, match):
    sched = Scheduler(SchedulerConfig(max_model_len=64, block_size=4), num_blocks=8)
    with pytest.raises(RequestRejected, match=match):
        sched.add(Sequence("x", [1] * prompt_len, SamplingParams(max_tokens=max_tokens)))
    assert not sched.has_unfinished()


def test_prefill_respects_token_budget_and_admits_oversized_alone():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, block_size=4), num_blocks=100)
    for i, n in enumerate([30, 4, 4, 4]):
        sched.add(Sequence(f"r{i}", [1] * n, SamplingParams(max_tokens=2)))
    first = sched.schedule()
    assert first.is_prefill and [s.request_id for s in first.seqs] == ["r0"]
    second = sched.schedule()
    assert [s.request_id for s in second.seqs] == ["r1", "r2"]


def test_a_pipelined_prefill_step_admits_its_stream_window():
    # a pipeline prefill stage admits a window of many micro-batches per step, not the decode-era budget
    cfg = SchedulerConfig(max_num_batched_tokens=10, block_size=4, prefill_window_tokens=40)
    assert cfg.prefill_budget == 40
    sched = Scheduler(cfg, num_blocks=100)
    for i, n in enumerate([12, 9, 9, 9, 9]):
        sched.add(Sequence(f"r{i}", [1] * n, SamplingParams(max_tokens=2)))
    assert [s.request_id for s in sched.schedule().seqs] == ["r0", "r1", "r2", "r3"]
    assert SchedulerConfig(max_num_batched_tokens=10, prefill_window_tokens=4).prefill_budget == 10
    with pytest.raises(ValueError, match="prefill_window_tokens"):
        SchedulerConfig(prefill_window_tokens=-1)
