"""Two-phase onboarding (prefetch): device blocks reserved for a load in flight are never handed to anyone
else, the host blocks it reads stay pinned until it lands, and every request still finishes exactly once."""
import random

import pytest

from seesaw_ds.engine.seesaw_scheduler import SeesawScheduler, TierConfig
from seesaw_ds.engine.sequence import SequenceStatus
from tests.engine.seesaw_driver import random_workload, worst_blocks


@pytest.mark.parametrize("seed", range(60))
def test_prefetch_never_reuses_blocks_in_flight(seed):
    rng = random.Random(1000 + seed)
    cfg, seqs, scripts = random_workload(rng, rng.randint(2, 40))
    widest = max(worst_blocks(s, cfg) for s in seqs)
    tiers = TierConfig(host_blocks=rng.randint(widest, 4 * widest), device_blocks=rng.randint(widest, 4 * widest),
                       threshold=rng.choice([0.0, 0.25, 0.5]), prefetch=True)
    sched = SeesawScheduler(cfg, tiers)
    for s in seqs:
        sched.add(s)
    in_flight: list[tuple[list[int], list[int]]] = []        # copies started last step, not yet landed
    landed_total, finished, steps = 0, [], 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch is not None, f"stalled: {sched.metrics}"
        if in_flight:                        # the engine waits for them before this forward
            assert batch.wait_prefetch
            landed_total += len(in_flight)
            in_flight = []
        reserved = {b for s in sched.prefetching for b in s.block_table}
        pinned = {b for s in sched.prefetching for b in s.host_blocks}
        for s in sched.prefetching:
            assert s.status is SequenceStatus.PREFETCHING and s not in batch.seqs
        # blocks reserved for loads in flight belong to no scheduled sequence, and stay allocated
        assert not reserved & {b for s in batch.seqs for b in s.block_table}
        assert not pinned & {b for s in batch.seqs for b in s.host_blocks}
        assert len(reserved) == sum(len(s.block_table) for s in sched.prefetching)
        for host, device in batch.prefetch or []:
            assert set(device) <= reserved and set(host) <= pinned
        for device, host in batch.swap_out or []:    # swap-outs never free or overwrite a load in flight
            assert not set(device) & reserved and not set(host) & pinned
        sched.host.check_integrity()
        sched.device.check_integrity()
        in_flight = list(batch.prefetch or [])
        tokens = [scripts[s.seq_id][len(s.output_token_ids)] for s in batch.seqs]
        finished += sched.postprocess(batch, tokens)
        steps += 1
        assert steps < 100_000
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert sched.host.num_used == 0 and sched.device.num_used == 0


def test_prefetch_overlaps_when_decode_has_work():
    rng = random.Random(7)
    cfg, seqs, scripts = random_workload(rng, 30)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=10_000, device_blocks=10_000, prefetch=True))
    for s in seqs:
        sched.add(s)
    prefetched = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        prefetched += len(batch.prefetch or [])
        sched.postprocess(batch, [scripts[s.seq_id][len(s.output_token_ids)] for s in batch.seqs])
    assert prefetched > 0 or cfg.max_num_seqs == 1
