import pytest
import torch

from seesaw_ds.parallel.kv_plan import KVRect, kv_ownership, kv_reshard_plan, moves_from, moves_into
from seesaw_ds.parallel.layout import Layout

SHAPES = [(7, 9, 3), (7, 8, 4), (5, 6, 1), (1, 4, 2), (9, 15, 5), (4, 4, 4)]  # (layers, heads, kv heads)


def _pairs(layers, kv):
    for n in range(1, 5):
        if n <= layers and n <= kv:
            yield Layout(pp=n), Layout(tp=n)
            yield Layout(tp=n), Layout(pp=n)
    if layers >= 2 and kv >= 2:
        yield Layout(tp=2, pp=2), Layout(tp=4) if kv >= 4 else Layout(pp=4) if layers >= 4 else Layout(tp=2, pp=2)
        if layers >= 4:
            yield Layout(pp=4), Layout(tp=2, pp=2)


def _cases():
    for layers, heads, kv in SHAPES:
        for src, dst in _pairs(layers, kv):
            yield pytest.param(layers, heads, kv, src, dst,
                               id=f"L{layers}kv{kv}-tp{src.tp}pp{src.pp}-to-tp{dst.tp}pp{dst.pp}")


# ---- test-local reference executors of the KV plan ----------------------------------------------------
# Local KV tensors share the host store's head-major order:  kv: [layers, 2, kv_heads, tokens, head_dim]
# where a rank's tensor spans only its owned (layers, heads) rectangle.

def apply_kv_moves(moves, sources, destinations):
    """Copy every move from its source rank's tensor into its destination rank's tensor."""
    for move in moves:
        src_layers, src_heads = move.src_slices
        dst_layers, dst_heads = move.dst_slices
        destinations[move.dst_rank][dst_layers, :, dst_heads].copy_(sources[move.src_rank][src_layers, :, src_heads])


def write_to_store(store, owned, local):
    layers, heads = owned.slices
    store[layers, :, heads].copy_(local)


def read_from_store(store, owned):
    layers, heads = owned.slices
    return store[layers, :, heads].clone(memory_format=torch.contiguous_format)


def _reference_block(store, rect):
    """store[rect] via explicit index lists (independent of the slicing helpers)."""
    return store[list(rect.layers)][:, :, list(rect.heads)]


@pytest.mark.parametrize("layers, heads, kv, src, dst", list(_cases()))
def test_moves_tile_and_copy(make_cfg, layers, heads, kv, src, dst):
    torch.set_num_threads(1)
    cfg = make_cfg(num_layers=layers, num_heads=heads, num_kv_heads=kv)
    plan = kv_reshard_plan(cfg, src, dst)
    assert plan == kv_reshard_plan(cfg, src, dst)  # deterministic

    grid = torch.zeros(layers, kv, dtype=torch.int32)
    for move in plan:
        grid[move.rect.slices] += 1
    assert torch.all(grid == 1)
    # every destination rank's rectangle is filled exactly by the moves into it
    for d, owned in enumerate(kv_ownership(cfg, dst)):
        assert sum(len(m.rect.layers) * len(m.rect.heads) for m in moves_into(plan, d)) == \
            len(owned.layers) * len(owned.heads)
    for s, owned in enumerate(kv_ownership(cfg, src)):
        assert sum(len(m.rect.layers) * len(m.rect.heads) for m in moves_from(plan, s)) == \
            len(owned.layers) * len(owned.heads)

    tokens, head_dim = 5, 3
    store = torch.randn(layers, 2, kv, tokens, head_dim)  # kv: [L, 2, kv_heads, T, D]
    src_owned, dst_owned = kv_ownership(cfg, src), kv_ownership(cfg, dst)
    sources = {r: _reference_block(store, rect).contiguous() for r, rect in enumerate(src_owned)}
    dests = {r: torch.full((len(rect.layers), 2, len(rect.heads), tokens, head_dim), float("nan"))
             for r, rect in enumerate(dst_owned)}
    apply_kv_moves(plan, sources, dests)
    for r, rect in enumerate(dst_owned):
        assert torch.equal(dests[r], _reference_block(store, rect)), r

    # through the host store: prefill ranks write their rectangles, decode ranks read theirs
    host = torch.full_like(store, float("nan"))
    for r, rect in enumerate(src_owned):
        write_to_store(host, rect, sources[r])
    assert torch.equal(host, store)
    for r, rect in enumerate(dst_owned):
        out = read_from_store(host, rect)
        assert out.is_contiguous() and torch.equal(out, dests[r])


def test_pp_to_tp_example(make_cfg):
    cfg = make_cfg(num_layers=7, num_heads=9, num_kv_heads=3)
    plan = kv_reshard_plan(cfg, Layout(pp=2), Layout(tp=2))
    # stages own layers 0-3 / 4-6; TP ranks own KV heads 0-1 / 2
    got = [(m.src_rank, m.dst_rank, m.rect.layers, m.rect.heads) for m in plan]
    assert got == [(0, 0, range(0, 4), range(0, 2)), (1, 0, range(4, 7), range(0, 2)),
                   (0, 1, range(0, 4), range(2, 3)), (1, 1, range(4, 7), range(2, 3))]
    assert plan[1].src_slices == (slice(0, 3), slice(0, 2))
    assert plan[1].dst_slices == (slice(4, 7), slice(0, 2))


def test_rect_validation_and_mismatched_replicas(make_cfg):
    with pytest.raises(ValueError, match="KVRect.heads"):
        KVRect(range(0, 2), range(1, 1))
    with pytest.raises(ValueError, match="not inside"):
        KVRect(range(0, 2), range(0, 1)).relative_to(KVRect(range(1, 3), range(0, 1)))
    with pytest.raises(ValueError, match="inside one replica"):
        kv_reshard_plan(make_cfg(), Layout(pp=2), Layout(tp=3))
