"""Swap-out under decode pressure (pure scheduler, hand-built outputs): a runner that must give up its device
blocks goes back to the host store with its cached KV and is resumed later; recompute only when the store
cannot hold it. A content model of both tiers executes every batch's copies in the engine's order and checks
that each decode step reads exactly the KV its sequence wrote, with prefetches landing early or late."""
import random

import pytest

from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import SchedulerConfig
from seesaw_ds.engine.seesaw_scheduler import SeesawScheduler, TierConfig
from seesaw_ds.engine.sequence import Sequence
from tests.engine.seesaw_driver import drive, expected_output, random_workload, worst_blocks


class TierContents:
    """What each slot of the device pool and the host store holds: (seq_id, token position) or None.

        device[block][offset], host[block][offset]   (a block is block_size slots)
    """

    def __init__(self, sched: SeesawScheduler, rng: random.Random):
        self.bs, self.rng = sched.config.block_size, rng
        self.device = [[None] * self.bs for _ in range(sched.device.num_blocks)]
        self.host = [[None] * self.bs for _ in range(sched.host.num_blocks)]
        self.in_flight: list[tuple[list[int], list[int]]] = []    # prefetch copies not yet landed

    @staticmethod
    def _copy(src, dst, src_blocks, dst_blocks):
        assert len(src_blocks) == len(dst_blocks)
        for a, b in zip(src_blocks, dst_blocks):
            dst[b] = list(src[a])

    def _land(self):
        for host, device in self.in_flight:
            self._copy(self.host, self.device, host, device)
        self.in_flight = []

    def step(self, batch) -> None:
        """The engine's order: wait for last step's prefetch -> swap-outs -> onboard -> start prefetch
        (it lands at a random moment before the next wait) -> forward (read the cache, write the new KV)."""
        bs = self.bs
        if self.in_flight:
            assert batch.wait_prefetch
            self._land()
        if batch.is_prefill:                     # every fed token's KV goes to the host store
            for s in batch.seqs:
                for i in range(s.num_tokens):
                    self.host[s.host_blocks[i // bs]][i % bs] = (s.seq_id, i)
            return
        for device, host in batch.swap_out or []:
            self._copy(self.device, self.host, device, host)
        for host, device in batch.onboard or []:
            self._copy(self.host, self.device, host, device)
        self.in_flight = list(batch.prefetch or [])
        if self.rng.random() < 0.5:              # the background copy may finish before the forward
            self._land()
        for s in batch.seqs:
            for i in range(s.num_tokens - 1):    # the cache holds every earlier token of this sequence
                got = self.device[s.block_table[i // bs]][i % bs]
                assert got == (s.seq_id, i), f"{s.request_id} reads {got} at position {i}"
            i = s.num_tokens - 1
            self.device[s.block_table[i // bs]][i % bs] = (s.seq_id, i)


def run_with_contents(sched: SeesawScheduler, scripts: dict, rng: random.Random) -> list[Sequence]:
    tiers, finished = TierContents(sched, rng), []
    while sched.has_unfinished():
        batch = sched.schedule()
        tiers.step(batch)
        finished += sched.postprocess(batch, [scripts[s.seq_id][len(s.output_token_ids)] for s in batch.seqs])
    return finished


def pressured_workload(seed: int, prefetch: bool):
    """Random requests against a device pool barely wider than the widest request."""
    rng = random.Random(5000 + seed)
    cfg, seqs, scripts = random_workload(rng, rng.randint(4, 40))
    widest = max(worst_blocks(s, cfg) for s in seqs)
    tiers = TierConfig(host_blocks=rng.randint(widest, 4 * widest), device_blocks=rng.randint(widest, 2 * widest),
                       threshold=rng.choice([0.0, 0.25, 0.5]), prefetch=prefetch)
    return rng, cfg, seqs, scripts, tiers


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("seed", range(60))
def test_swap_out_keeps_invariants_and_every_request_finishes_once(seed, prefetch):
    _, cfg, seqs, scripts, tiers = pressured_workload(seed, prefetch)
    sched = SeesawScheduler(cfg, tiers)
    for s in seqs:
        sched.add(s)
    finished, _, _ = drive(sched, scripts)        # budgets, block ownership, copy shapes, at every step
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    for s in finished:
        assert (s.output_token_ids, s.finish_reason) == expected_output(s, scripts[s.seq_id])


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("seed", range(60))
def test_every_decode_step_reads_the_kv_its_sequence_wrote(seed, prefetch):
    rng, cfg, seqs, scripts, tiers = pressured_workload(seed, prefetch)
    sched = SeesawScheduler(cfg, tiers)
    for s in seqs:
        sched.add(s)
    finished = run_with_contents(sched, scripts, rng)
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)


def _pressure(host_blocks: int, swap_out: bool = True, prefetch: bool = False):
    """Eight runners that fit the pool at first and then outgrow it (block_size 4, 6 new blocks each)."""
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=64, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=host_blocks, device_blocks=24, threshold=0.25,
                                            prefetch=prefetch, swap_out=swap_out))
    seqs = [Sequence(f"r{i}", [3] * 9, SamplingParams(max_tokens=24, ignore_eos=True)) for i in range(8)]
    for s in seqs:
        sched.add(s)
    return sched, seqs, {s.seq_id: [4] * 24 for s in seqs}


@pytest.mark.parametrize("prefetch", [False, True])
def test_runners_that_outgrow_the_pool_are_swapped_out_not_recomputed(prefetch):
    sched, seqs, scripts = _pressure(host_blocks=64, prefetch=prefetch)
    finished, phases, _ = drive(sched, scripts)
    assert sched.num_swap_outs > 0 and sched.num_preemptions == 0
    assert len(phases) == 1 and phases[0]["blocks"] == 8 * 3     # each prompt prefilled once, never again
    assert sorted(len(s.output_token_ids) for s in finished) == [24] * 8
    sched, _, scripts = _pressure(host_blocks=64, prefetch=prefetch)
    assert len(run_with_contents(sched, scripts, random.Random(0))) == 8


def test_swapped_out_sequence_is_resumed_first():
    sched, seqs, scripts = _pressure(host_blocks=64)
    victims, resumed = set(), set()
    while sched.has_unfinished():
        front_host = list(sched.stashed[0].host_blocks) if sched.stashed else None
        batch = sched.schedule()
        if batch.onboard:                         # loads start at the front of `stashed`
            assert batch.onboard[0][0] == front_host
            resumed |= {s.seq_id for s in batch.seqs} & victims
        for device, host in batch.swap_out or []:
            victims |= {s.seq_id for s in sched.stashed if s.host_blocks == host}
        if batch.swap_out:                        # the last victim heads the queue
            assert sched.stashed[0].host_blocks == batch.swap_out[-1][1]
        sched.postprocess(batch, [scripts[s.seq_id][len(s.output_token_ids)] for s in batch.seqs])
    assert victims and resumed == victims


def test_host_store_too_full_to_take_a_victim_falls_back_to_recompute():
    """16 prompts of 5 blocks, a store of 22: it refills while runners grow, so a victim (>= 5 blocks)
    cannot always go back to it."""
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=64, block_size=4)
    sched = SeesawScheduler(cfg, TierConfig(host_blocks=22, device_blocks=24, threshold=0.25))
    seqs = [Sequence(f"r{i}", [3] * 17, SamplingParams(max_tokens=24, ignore_eos=True)) for i in range(16)]
    for s in seqs:
        sched.add(s)
    finished, _, _ = drive(sched, {s.seq_id: [4] * 24 for s in seqs})
    assert sched.num_preemptions > 0 and len(finished) == 16


def test_swap_out_off_recomputes_only():
    sched, _, scripts = _pressure(host_blocks=64, swap_out=False)
    finished, phases, _ = drive(sched, scripts)
    assert sched.num_swap_outs == 0 and sched.num_preemptions > 0 and len(finished) == 8
    assert sum(p["blocks"] for p in phases) > 8 * 3                 # recomputed prompts went through the store
