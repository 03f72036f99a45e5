"""Drive a SeesawScheduler with hand-built model outputs (no model, no ranks, no tensors) and check every
step: where each sequence sits, which blocks it owns in which tier, the copies each batch asks for
(onboard, prefetch, swap-out), and the engine's execution order assumptions. Shared by the scheduler tests."""
from __future__ import annotations

import random

from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import SchedulerConfig
from seesaw_ds.engine.seesaw_scheduler import PREFILL, SeesawScheduler
from seesaw_ds.engine.sequence import Sequence, SequenceStatus

EOS = 1


def blocks(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def expected_output(seq: Sequence, script: list[int]) -> tuple[list[int], str]:
    """Reference: the scripted tokens cut at the first EOS (unless ignored) or at the length limit."""
    limit = min(seq.params.max_tokens, seq.max_model_len - len(seq.prompt_token_ids))
    for i, tok in enumerate(script[:limit]):
        if tok == EOS and not seq.params.ignore_eos:
            return script[:i + 1], "stop"
    return script[:limit], "length"


def check_state(sched: SeesawScheduler, live: dict[int, Sequence], prefilling: list[Sequence]) -> None:
    """Each live sequence sits in exactly one place; its blocks match that place; the tiers' used counts
    equal the blocks the sequences own, with no block owned twice. `prefilling`: a prefill batch between
    schedule() and postprocess() (host blocks held, not yet in `stashed`)."""
    places = [(sched.waiting, SequenceStatus.WAITING), (sched.stashed, SequenceStatus.STASHED),
              (sched.running, SequenceStatus.RUNNING), (sched.prefetching, SequenceStatus.PREFETCHING),
              (prefilling, SequenceStatus.STASHED)]
    seen: list[int] = [s.seq_id for queue, _ in places for s in queue]
    assert len(seen) == len(set(seen)), "a sequence is in two states"
    assert set(seen) == set(live), "a live sequence is lost, or a finished one is still queued"
    for queue, status in places:
        for s in queue:
            assert s.status is status, (s.request_id, s.status, status)
            if status is SequenceStatus.PREFETCHING:     # device blocks reserved, host blocks pinned
                assert s.host_blocks and s.block_table
            else:
                assert not (s.host_blocks and s.block_table), "KV held in both tiers"
    host_owned = [b for s in [*sched.stashed, *prefilling, *sched.prefetching] for b in s.host_blocks]
    device_owned = [b for s in [*sched.running, *sched.prefetching] for b in s.block_table]
    assert all(not s.host_blocks and not s.block_table for s in sched.waiting)
    for tier, owned in ((sched.host, host_owned), (sched.device, device_owned)):
        tier.check_integrity()
        assert len(owned) == len(set(owned)) == tier.num_used <= tier.num_blocks
        assert all(0 <= b < tier.num_blocks for b in owned)


def check_decode_copies(sched: SeesawScheduler, batch, host_before: dict, device_before: dict,
                        swaps_before: int) -> None:
    """A decode batch's copies: loads read all the stashed KV from the sequence's own host blocks into the
    head of its block table; swap-outs write a runner's cached KV from the head of its block table into
    fresh host blocks, and it sits at the front of `stashed`; in-flight loads are never touched."""
    bs = sched.config.block_size
    held = lambda s: s.block_table[:blocks(s.num_tokens - 1, bs)]        # noqa: E731
    loaded_sync = [s for s in batch.seqs if s.seq_id in host_before]
    loaded_async = [s for s in sched.prefetching if s.seq_id in host_before]
    assert len(loaded_async) == len(sched.prefetching), "a load in flight was not stashed before"
    for copies, loaded in ((batch.onboard or [], loaded_sync), (batch.prefetch or [], loaded_async)):
        by_device = {tuple(device): host for host, device in copies}
        assert len(by_device) == len(copies) == len(loaded), "load copies mismatch"
        for s in loaded:
            assert by_device.get(tuple(held(s))) == host_before[s.seq_id], "a load reads foreign blocks"
    swaps = batch.swap_out or []
    assert sched.num_swap_outs - swaps_before == len(swaps)
    if swaps:       # the engine runs swap-outs before loads: a step that did both would read garbage
        assert not batch.onboard and not batch.prefetch, "a step both loads and swaps out"
    reserved = {b for s in sched.prefetching for b in s.block_table}
    pinned = {b for s in sched.prefetching for b in s.host_blocks}
    front = list(sched.stashed)[:len(swaps)]
    for (device, host), s in zip(reversed(swaps), front):         # appendleft: the last victim is first
        assert s.status is SequenceStatus.STASHED and s not in batch.seqs
        assert s.seq_id in device_before and s.seq_id not in host_before, "victim was not a runner"
        assert s.host_blocks == host and len(host) == blocks(s.num_tokens - 1, bs)
        assert device == device_before[s.seq_id][:len(host)], "swap-out reads foreign device blocks"
        assert not set(device) & reserved and not set(host) & pinned, "swap-out touches a load in flight"


def drive(sched: SeesawScheduler, scripts: dict[int, list[int]]):
    """Run to completion; check every step; return finished sequences and per-prefill-phase records."""
    cfg, first_stage_prefill, switches_before = sched.config, sched.stage == PREFILL, sched.num_switches
    live = {s.seq_id: s for q in (sched.waiting, sched.stashed, sched.running) for s in q}
    admitted, finished, phases, kinds = set(), [], [], []
    while sched.has_unfinished():
        host_before = {s.seq_id: list(s.host_blocks) for s in sched.stashed}
        device_before = {s.seq_id: list(s.block_table) for s in [*sched.running, *sched.prefetching]}
        in_flight = list(sched.prefetching)           # phase 2 (which frees their host blocks) comes first
        occupancy_before = sched.host.num_used - sum(len(s.host_blocks) for s in in_flight)
        stashed_before, swaps_before = len(sched.stashed), sched.num_swap_outs
        batch = sched.schedule()
        assert batch is not None, f"stalled with work left: {sched.metrics}"
        assert batch.is_prefill == (sched.stage == PREFILL)
        assert 1 <= len(batch.seqs) <= cfg.max_num_seqs
        assert batch.wait_prefetch == bool(in_flight), "the engine must wait for last step's loads"
        if batch.is_prefill:
            assert len(batch.seqs) == 1 or batch.num_tokens <= cfg.max_num_batched_tokens
            assert not batch.swap_out and not sched.prefetching
            if not kinds or not kinds[-1]:       # a new prefill phase starts
                phases.append({"blocks": 0, "largest": 0, "fresh": False, "start_used": occupancy_before,
                               "start_stashed": stashed_before})
            for s in batch.seqs:                 # host blocks for every token fed, nothing on the device
                assert len(s.host_blocks) == blocks(s.num_tokens, cfg.block_size) and not s.block_table
                phases[-1]["blocks"] += len(s.host_blocks)
                phases[-1]["largest"] = max(phases[-1]["largest"], len(s.host_blocks))
                phases[-1]["fresh"] |= s.seq_id not in admitted
                admitted.add(s.seq_id)
            check_state(sched, live, batch.seqs)
        else:
            assert batch.num_tokens <= cfg.max_num_batched_tokens
            assert {s.seq_id for s in batch.seqs} == {s.seq_id for s in sched.running}, "a runner starved"
            for s in batch.seqs:                 # device blocks for every token, the one fed now included
                assert len(s.block_table) == blocks(s.num_tokens, cfg.block_size)
            check_decode_copies(sched, batch, host_before, device_before, swaps_before)
            check_state(sched, live, [])
        kinds.append(batch.is_prefill)
        tokens = [scripts[s.seq_id][len(s.output_token_ids)] for s in batch.seqs]
        for s in sched.postprocess(batch, tokens):
            assert not s.host_blocks and not s.block_table and s.status is SequenceStatus.FINISHED
            finished.append(live.pop(s.seq_id))
        check_state(sched, live, [])
        assert len(kinds) < 100_000
    transitions = sum(a != b for a, b in zip([first_stage_prefill, *kinds], kinds))
    assert sched.num_switches - switches_before == transitions, "a switch without a batch of the new stage"
    assert sched.host.num_used == 0 and sched.device.num_used == 0
    return finished, phases, kinds


def random_workload(rng: random.Random, n_requests: int):
    block_size = rng.choice([1, 2, 4, 8, 16])
    max_model_len = rng.randint(8, 200)
    cfg = SchedulerConfig(max_num_seqs=rng.randint(1, 24), max_num_batched_tokens=rng.randint(1, 400),
                          max_model_len=max_model_len, block_size=block_size)
    seqs, scripts = [], {}
    eos_rate = rng.choice([0.0, 0.02, 0.2])
    for i in range(n_requests):
        n = rng.randint(1, max_model_len - 1)
        params = SamplingParams(max_tokens=rng.randint(1, 60), ignore_eos=rng.random() < 0.3)
        seq = Sequence(f"r{i}", [rng.randint(2, 99)] * n, params, (EOS,), max_model_len)
        scripts[seq.seq_id] = [EOS if rng.random() < eos_rate else rng.randint(2, 99)
                               for _ in range(params.max_tokens)]
        seqs.append(seq)
    return cfg, seqs, scripts


def worst_blocks(seq: Sequence, cfg: SchedulerConfig) -> int:
    return blocks(min(len(seq.prompt_token_ids) + seq.params.max_tokens, cfg.max_model_len), cfg.block_size)
