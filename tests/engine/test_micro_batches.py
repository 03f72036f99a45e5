"""Micro-batch plans: prefill groups balance prompt tokens, lightest first; decode runs stay consecutive."""
import random

from seesaw_ds.engine.inputs import balanced_groups, micro_batch_groups
from seesaw_ds.engine.scheduler import ScheduledBatch
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.sequence import Sequence


def lockstep_seconds(loads: list[int]) -> int:
    """Two stages in lockstep, each micro-batch costing its load on either stage: fill, ticks, drain."""
    return loads[0] + sum(max(a, b) for a, b in zip(loads, loads[1:])) + loads[-1]


def test_groups_cover_every_index_once_in_source_order_lightest_first():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.randint(1, 1700) for _ in range(rng.randint(1, 40))]
        n = rng.randint(1, 20)
        groups = balanced_groups(sizes, n)
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
        assert len(groups) == min(n, len(sizes)) and all(g == sorted(g) for g in groups)
        loads = [sum(sizes[i] for i in g) for g in groups]
        assert loads == sorted(loads)
        # greedy largest-first: no group exceeds the mean by more than the largest item it could not split
        assert max(loads) <= sum(sizes) / len(groups) + max(sizes)


def test_balanced_groups_shorten_a_lockstep_pass_of_sharegpt_like_prompts():
    """32 prompts of 20-1700 tokens in 16 micro-batches: consecutive runs cut at equal token shares, in
    source order, take 15% longer in lockstep than the balanced plan, which is within one largest group of
    the sum (the floor of any order)."""
    rng = random.Random(1)
    sizes = [rng.randint(20, 1700) for _ in range(32)]
    balanced = [sum(sizes[i] for i in g) for g in balanced_groups(sizes, 16)]
    consecutive = [sum(sizes[2 * k:2 * k + 2]) for k in range(16)]
    assert lockstep_seconds(balanced) == sum(sizes) + max(balanced)
    assert lockstep_seconds(consecutive) > 1.15 * lockstep_seconds(balanced)
    assert max(balanced) < 1.1 * sum(sizes) / 16


def test_equal_prompts_keep_one_per_group_in_order_and_decode_stays_consecutive():
    assert balanced_groups([1536] * 8, 16) == [[i] for i in range(8)]
    assert balanced_groups([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams()) for i in range(5)]
    assert micro_batch_groups(ScheduledBatch(False, seqs), 2) == [[0, 1, 2], [3, 4]]
    assert micro_batch_groups(ScheduledBatch(False, seqs), 9) == [[i] for i in range(5)]
    assert micro_batch_groups(ScheduledBatch(True, seqs), 1) == [list(range(5))]


def test_prefill_micro_batch_count_follows_the_step_size():
    from seesaw_ds.parallel.micro_batches import PREFILL_WINDOW, prefill_micro_batch_count, prefill_window_tokens
    assert prefill_micro_batch_count(100) == 1                 # a few prompts: one micro-batch
    assert prefill_micro_batch_count(1536) == 2
    assert prefill_micro_batch_count(32 * 128) == 4            # the fixed workload's 32 prompts of 128
    assert prefill_micro_batch_count(16_525) == PREFILL_WINDOW
    assert prefill_micro_batch_count(prefill_window_tokens(2)) == PREFILL_WINDOW   # a full window
    assert prefill_micro_batch_count(10**6, most=8) == 8
    counts = [prefill_micro_batch_count(t) for t in range(0, 40_000, 97)]
    assert counts == sorted(counts)
