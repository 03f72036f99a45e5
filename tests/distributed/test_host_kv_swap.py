"""HostKVStore.save_from (swap-out) is the exact inverse of load_into for any rank's rectangle (the moves of
the KV re-shard plan into and out of it), writes only that rectangle of the named host blocks, and reports
the bytes it moved. No ranks: a store over a temp file."""
import pytest
import torch
from transformers import LlamaConfig

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.kv.pool import KVPool, KVPoolSpec
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.kv_plan import kv_ownership, kv_reshard_plan, moves_from, moves_into
from seesaw_ds.parallel.layout import Layout

BS, HOST_BLOCKS, SENTINEL = 4, 10, -7.0


def _cfg() -> ModelConfig:      # 5 layers, 6 query / 3 KV heads, head_dim 4
    return ModelConfig.from_hf(LlamaConfig(vocab_size=32, hidden_size=24, intermediate_size=32,
                                           num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3))


@pytest.mark.parametrize("device, host, back", [([3, 0, 5], [7, 2, 9], [1, 4, 2]),          # scattered
                                                ([0, 1, 2, 5], [4, 5, 6, 1], [2, 3, 4, 0])])  # runs of blocks
@pytest.mark.parametrize("prefill, decode, rank", [
    (Layout(pp=2), Layout(tp=2), 0),     # a TP rank: all layers, 2 of 3 heads, read from two PP stages
    (Layout(pp=3), Layout(tp=3), 2),     # a TP rank: all layers, its 1 head, read from three stages
    (Layout(tp=2), Layout(pp=2), 1),     # a PP stage: its layers, all heads, read from two TP ranks
    (Layout(), Layout(), 0)])            # one rank
def test_save_from_inverts_load_into_and_writes_only_its_rectangle(prefill, decode, rank, device, host, back,
                                                                   tmp_path):
    cfg = _cfg()
    rect = kv_ownership(cfg, decode)[rank]
    layers, heads = rect.layers, rect.heads
    loads = moves_into(kv_reshard_plan(cfg, prefill, decode), rank)
    saves = moves_from(kv_reshard_plan(cfg, decode, prefill), rank)
    assert len(loads) == len(saves) == prefill.ranks_per_replica
    store = HostKVStore(cfg, HOST_BLOCKS, BS, torch.float32, str(tmp_path / "kv"), create=True)
    store.tensor.fill_(SENTINEL)                                     # [L, 2, Hkv, HOST_BLOCKS * BS, D]
    spec = KVPoolSpec(layers, heads, 6, BS, cfg.head_dim, torch.float32)
    pool = KVPool(spec)                                              # [2, Lr, 6, BS, Hr, D]
    pool.tensor.copy_(torch.randn(spec.shape, generator=torch.Generator().manual_seed(0)))

    moved = store.save_from(pool, saves, device, host)
    assert moved == len(device) * spec.bytes_per_block
    l, h = slice(layers.start, layers.stop), slice(heads.start, heads.stop)
    for d_blk, h_blk in zip(device, host):
        got = store.tensor[l, :, h, h_blk * BS:(h_blk + 1) * BS]    # [Lr, 2, Hr, BS, D]
        want = pool.tensor[:, :, d_blk].permute(1, 0, 3, 2, 4)       # [2, Lr, BS, Hr, D] -> [Lr, 2, Hr, BS, D]
        assert torch.equal(got, want)
    written = torch.zeros(store.tensor.shape, dtype=torch.bool)
    for h_blk in host:
        written[l, :, h, h_blk * BS:(h_blk + 1) * BS] = True
    assert (store.tensor[~written] == SENTINEL).all(), "wrote outside its rectangle or its host blocks"

    back_blocks, back = back, KVPool(spec)                           # round trip into other device blocks
    assert store.load_into(back, loads, host, back_blocks) == moved
    for src, dst in zip(device, back_blocks):
        assert torch.equal(back.tensor[:, :, dst], pool.tensor[:, :, src])


def test_copies_reject_mismatched_block_lists(tmp_path):
    cfg = _cfg()
    store = HostKVStore(cfg, HOST_BLOCKS, BS, torch.float32, str(tmp_path / "kv"), create=True)
    pool = KVPool(KVPoolSpec(range(5), range(3), 4, BS, cfg.head_dim, torch.float32))
    moves = kv_reshard_plan(cfg, Layout(), Layout())
    with pytest.raises(ValueError, match="2 device blocks for 1 host blocks"):
        store.save_from(pool, moves, [0, 1], [3])
    with pytest.raises(ValueError, match="1 device blocks for 2 host blocks"):
        store.load_into(pool, moves, [0, 1], [3])
    assert store.save_from(pool, moves, [], []) == 0 and store.load_into(pool, moves, [], []) == 0


def test_slot_runs_cover_every_token_once():
    from seesaw_ds.distributed.host_kv import slot_runs
    assert slot_runs(torch.tensor([8, 9, 10, 32, 33])) == [(0, 8, 3), (3, 32, 2)]
    assert slot_runs(torch.tensor([5])) == [(0, 5, 1)] and slot_runs(torch.tensor([], dtype=torch.long)) == []
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(64, generator=g)[:40]
    covered = [(src + i, dst + i) for src, dst, n in slot_runs(slots) for i in range(n)]
    assert covered == list(enumerate(slots.tolist()))
