"""The Seesaw scheduler alone, driven over many random workloads with hand-built model outputs (no model,
no ranks). Every step is checked against invariants; every finished request against a reference replay of
its scripted tokens; the number of prefill -> decode switches against the host-store refill bound."""
import math
import random

import pytest

from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import RequestRejected, SchedulerConfig
from seesaw_ds.engine.seesaw_scheduler import PREFILL, SeesawScheduler, TierConfig
from seesaw_ds.engine.sequence import Sequence
from tests.engine.seesaw_driver import blocks, drive, expected_output, random_workload, worst_blocks

@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("seed", range(150))
def test_random_workloads_keep_invariants_finish_once_and_bound_switches(seed, prefetch):
    rng = random.Random(seed)
    cfg, seqs, scripts = random_workload(rng, rng.randint(1, 40))
    widest = max(worst_blocks(s, cfg) for s in seqs)
    tiers = TierConfig(host_blocks=rng.randint(max(1, widest // 2), 4 * widest),
                       device_blocks=rng.randint(max(1, widest // 2), 4 * widest),
                       threshold=rng.choice([0.0, 0.1, 0.25, 0.5, 0.9, rng.random() * 0.99]), prefetch=prefetch)
    sched = SeesawScheduler(cfg, tiers)
    accepted = []
    for s in seqs:      # rejected at admission exactly when one tier could never hold the request
        too_big = worst_blocks(s, cfg) > min(tiers.host_blocks, tiers.device_blocks)
        if too_big:
            with pytest.raises(RequestRejected, match="KV blocks"):
                sched.add(s)
        else:
            sched.add(s)
            accepted.append(s)
    finished, phases, kinds = drive(sched, scripts)

    assert sorted(s.request_id for s in finished) == sorted(s.request_id for s in accepted)
    for s in finished:
        assert (s.output_token_ids, s.finish_reason) == expected_output(s, scripts[s.seq_id]), s.request_id

    # Switch bound. A refill starts from <= threshold x C and runs until the queue is empty or the next
    # prompt does not fit, so unless it empties the queue it admits >= C - floor(threshold x C) - (b - 1)
    # blocks (b: the largest admission; FIFO packing can strand b - 1 blocks). Only one refill admitting
    # fresh prompts can empty the queue; later ones re-admit preempted sequences only, and the KV they
    # recompute counts in P. With one-block prompts and no preemption this is the issue's
    # ceil(P / (C x (1 - threshold))) + 1 (see the next test).
    switches = sum(a and not b for a, b in zip(kinds, kinds[1:]))
    fresh_prompt_blocks = sum(blocks(len(s.prompt_token_ids), cfg.block_size) for s in accepted)
    admitted_blocks = sum(p["blocks"] for p in phases)
    largest = max((p["largest"] for p in phases), default=1)
    C = tiers.host_blocks
    refill = max(1, C - math.floor(tiers.threshold * C) - (largest - 1))
    recompute_only = sum(not p["fresh"] for p in phases)
    assert switches <= admitted_blocks // refill + 1 + recompute_only, (switches, phases)
    for p in phases[1:]:     # a refill starts only once the store drained, and is a full one unless
        assert p["start_used"] <= tiers.threshold * C, p     # nothing was left to onboard
        assert p["blocks"] >= refill or p["start_stashed"] == 0, p
    if sched.num_preemptions == 0:
        assert admitted_blocks == fresh_prompt_blocks and recompute_only == 0


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("seed", range(60))
def test_switch_bound_of_the_issue_when_prompts_fill_whole_blocks_and_nothing_is_preempted(seed, prefetch):
    """Prompts of one block each and a device pool that holds every request: the bound is exactly
    ceil(P / (C x (1 - threshold))) + 1 with P the prompts' blocks and C the host blocks."""
    rng = random.Random(1000 + seed)
    cfg, seqs, scripts = random_workload(rng, rng.randint(5, 60))
    cfg = SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                          block_size=cfg.max_model_len)
    threshold = rng.choice([0.0, 0.25, 0.5, 0.75, rng.random() * 0.99])
    tiers = TierConfig(host_blocks=rng.randint(1, 12),
                       device_blocks=sum(worst_blocks(s, cfg) for s in seqs), threshold=threshold,
                       prefetch=prefetch)
    sched = SeesawScheduler(cfg, tiers)
    for s in seqs:
        sched.add(s)
    finished, _, kinds = drive(sched, scripts)
    assert len(finished) == len(seqs) and sched.num_preemptions == 0 and sched.num_swap_outs == 0
    P = sum(blocks(len(s.prompt_token_ids), cfg.block_size) for s in seqs)
    switches = sum(a and not b for a, b in zip(kinds, kinds[1:]))
    assert switches <= math.ceil(P / (tiers.host_blocks * (1 - threshold))) + 1


def _two_phase_run(threshold: float):
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=1000, max_model_len=64, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=40, device_blocks=24, threshold=threshold))
    seqs = [Sequence(f"r{i}", [7] * 16, SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(24)]
    for s in seqs:
        sched.add(s)
    refills = []
    while sched.has_unfinished():
        before = sched.metrics
        batch = sched.schedule()
        assert batch is not None
        if batch.is_prefill and before["stage"] != PREFILL:
            refills.append(before)
        sched.postprocess(batch, [5] * len(batch.seqs))
    return refills


def test_threshold_decides_when_decode_returns_to_prefill():
    eager, lazy = _two_phase_run(0.5), _two_phase_run(0.0)
    assert eager and lazy and all(m["host_occupancy"] <= 0.5 for m in eager) and any(m["stashed"] > 0 for m in eager)
    assert all(m["host_occupancy"] == 0 and m["stashed"] == 0 for m in lazy)


def test_store_below_threshold_but_next_prompt_too_big_keeps_decoding_without_stalling():
    cfg = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=10, device_blocks=12, threshold=0.9))
    seqs = [Sequence(f"r{i}", [3] * n, SamplingParams(max_tokens=4, ignore_eos=True))
            for i, n in enumerate([4, 32, 32])]          # 1 + 8 + 8 prompt blocks
    for s in seqs:
        sched.add(s)
    for _ in range(3):       # prefill r0, prefill r1 (9 of 10 blocks), decode r0 (r1 waits: max_num_seqs)
        sched.postprocess(batch := sched.schedule(), [5] * len(batch.seqs))
    assert not batch.is_prefill and sched.stashed[0].request_id == "r1"
    assert sched.host_occupancy <= 0.9 and not sched.host.can_allocate(8)
    finished, _, _ = drive(sched, {s.seq_id: [4] * 4 for s in seqs})
    assert sorted(s.request_id for s in finished) == ["r0", "r1", "r2"]


def test_preempted_sequences_are_recomputed_through_the_store_and_finish_when_swap_out_is_off():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=128, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=30, device_blocks=20, threshold=0.25, swap_out=False))
    seqs = [Sequence(f"r{i}", [3] * (5 + 3 * i), SamplingParams(max_tokens=40)) for i in range(12)]
    for s in seqs:
        sched.add(s)
    finished, phases, _ = drive(sched, {s.seq_id: [4] * 40 for s in seqs})
    prompt_blocks = sum(blocks(len(s.prompt_token_ids), 4) for s in seqs)
    assert sched.num_preemptions > 0 and sum(p["blocks"] for p in phases) > prompt_blocks
    assert sched.num_swap_outs == 0
    assert sorted(len(s.output_token_ids) for s in finished) == [40] * 12


@pytest.mark.parametrize("host, device, prompt, max_tokens, match", [
    (4, 100, 20, 4, "the host store has 4"),
    (100, 5, 20, 4, "the device pool has 5"),
    (100, 100, 64, 4, "leaves no room"),
    (100, 100, 0, 4, "empty prompt"),
])
def test_request_that_cannot_fit_is_rejected_and_the_rest_still_finish(host, device, prompt, max_tokens, match):
    cfg = SchedulerConfig(max_model_len=64, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=host, device_blocks=device))
    with pytest.raises(RequestRejected, match=match):
        sched.add(Sequence("big", [2] * prompt, SamplingParams(max_tokens=max_tokens)))
    assert not sched.has_unfinished() and sched.schedule() is None and sched.num_switches == 0
    small = Sequence("small", [2] * 3, SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add(small)
    finished, _, _ = drive(sched, {small.seq_id: [9, 9]})
    assert [s.request_id for s in finished] == ["small"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(host_blocks=8, device_blocks=8, threshold=1.0), "kv.threshold"),
    (dict(host_blocks=8, device_blocks=8, threshold=-0.1), "kv.threshold"),
    (dict(host_blocks=8, device_blocks=8, threshold=float("nan")), "kv.threshold"),
    (dict(host_blocks=0, device_blocks=8), "kv.host_blocks"),
    (dict(host_blocks=8, device_blocks=0), "kv.device_blocks"),
])
def test_tier_config_errors_name_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TierConfig(**kwargs)


def test_abort_in_every_state_frees_both_tiers():
    # 4 prompts of 8 tokens (blocks of 4): all stashed by one prefill; the device pool holds only two of
    # them, so after the first decode step two run, one is prefetching (in flight) and one stays stashed
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=16, device_blocks=7, prefetch=True))
    seqs = [Sequence(str(i), list(range(1, 9)), SamplingParams(max_tokens=6)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and len(batch.seqs) == 4
    sched.postprocess(batch, [5] * 4)
    batch = sched.schedule()                                   # onboard: loads land now (nothing running)
    sched.postprocess(batch, [5] * len(batch.seqs))
    batch = sched.schedule()                                   # decode the runners, prefetch the next
    states = {s.request_id: s.status.value for s in seqs}
    running = [s for s in seqs if states[s.request_id] == "running"]
    others = [s for s in seqs if states[s.request_id] in ("stashed", "prefetching")]
    assert running and others, states
    for seq in others + running[:1]:
        assert sched.abort(seq) and seq.finish_reason == "abort"
    assert not sched.abort(running[0])                         # already gone
    sched.postprocess(batch, [5] * len(batch.seqs))
    while sched.has_unfinished():                              # in-flight loads land and are freed
        batch = sched.schedule()
        if batch is None:
            break
        sched.postprocess(batch, [5] * len(batch.seqs))
    assert sched.device.num_used == 0 and sched.host.num_used == 0
    sched.device.check_integrity()
    sched.host.check_integrity()
