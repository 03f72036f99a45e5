"""The decode staircase: continuous batching's steps per batch size, and the planner costing each step at the
batch it runs (a short job with one long output is slower than its mean length says)."""
import random

import pytest

from seesaw_ds.planner import WorkloadSpec, load_model_config, parse_cluster, plan_layouts
from seesaw_ds.planner import roofline as rl
from seesaw_ds.planner.search import PlannerOptions, estimate_stage
from seesaw_ds.planner.workload import decode_schedule


def simulate(lens, limit):
    """Step by step, the obvious way: the reference the heap version must match."""
    steps, pending, running = {}, list(lens), []
    while pending or running:
        while pending and len(running) < limit:
            running.append(pending.pop(0))
        steps[len(running)] = steps.get(len(running), 0) + 1
        running = [n - 1 for n in running if n > 1]
    return steps


@pytest.mark.parametrize("seed", range(5))
def test_schedule_matches_a_step_by_step_simulation(seed):
    rng = random.Random(seed)
    lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
    for limit in (1, 3, 8, 100):
        got = decode_schedule(lens, limit)
        assert got == simulate(lens, limit)
        assert sum(b * s for b, s in got.items()) == sum(lens)        # every output token once


def test_schedule_of_equal_lengths_is_full_batches():
    assert decode_schedule([5] * 8, 4) == {4: 10}
    assert decode_schedule([3, 1, 2], 8) == {3: 1, 2: 1, 1: 1}
    with pytest.raises(ValueError, match="batch_limit"):
        decode_schedule([1], 0)


def test_spec_from_lengths_and_validation():
    spec = WorkloadSpec.from_lengths("w", [10, 30], [4, 8])
    assert (spec.mean_prompt_len, spec.mean_output_len, spec.num_requests, spec.output_lens) == (20, 6, 2, (4, 8))
    assert spec.with_requests(2) is spec and spec.with_requests(3).output_lens is None
    with pytest.raises(ValueError, match="output_lens"):
        WorkloadSpec("w", 10, 6, 3, (4, 8))


def test_planner_costs_the_tail_of_small_batches():
    cfg, cluster = load_model_config("llama-2-70b"), parse_cluster("8xA10")
    lens = [1000] + [100] * 7                                         # mean 212.5, one long tail
    staircase = WorkloadSpec.from_lengths("tail", [500] * 8, lens)
    means = WorkloadSpec("means", 500, staircase.mean_output_len, 8)
    options = PlannerOptions()
    d = (8, 1, 1)
    tail = estimate_stage(cfg, cluster, d, rl.DECODE, staircase, options)
    flat = estimate_stage(cfg, cluster, d, rl.DECODE, means, options)
    # 100 steps at batch 8 and 900 at batch 1, each costed at its own batch
    expect = (rl.stage_step_time(cfg, cluster, d, rl.DECODE, 8, tail.seq_len, "bfloat16", 1).total * 100
              + rl.stage_step_time(cfg, cluster, d, rl.DECODE, 1, tail.seq_len, "bfloat16", 1).total * 900)
    assert tail.total.total == pytest.approx(expect, rel=1e-9)
    assert flat.total is None
    slow, fast = plan_layouts(cfg, cluster, staircase, options), plan_layouts(cfg, cluster, means, options)
    assert slow.best_static.tokens_per_s < 0.7 * fast.best_static.tokens_per_s
