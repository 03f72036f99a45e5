"""Small executors for the pure plans: cut weight shards, put them back, move KV rectangles."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from seesaw_ds.parallel.kv_plan import KVMove, KVRect
from seesaw_ds.parallel.weight_plan import ShardEntry, WeightPlan


def materialize_shard(entries: Iterable[ShardEntry], full: Mapping[str, torch.Tensor],
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A rank's shard dict: each entry's slice of `full`, copied into its own contiguous tensor.

    `full` may hold memory-mapped tensors (safetensors `safe_open`, `torch.load(mmap=True)`): only the
    slices this rank needs are read. Entries that read the same region share one tensor (a tied head
    on a stage that also holds the embedding stays tied). With `out`, each slice is copied into the
    existing tensor `out[entry.name]` instead (e.g. a module's parameters at a stage switch).
    """
    result: dict[str, torch.Tensor] = {}
    made: dict[tuple, torch.Tensor] = {}
    for entry in entries:
        key = (entry.source_name, entry.source_ranges)
        if out is None and key in made:
            result[entry.name] = made[key]
            continue
        source = full[entry.source_name]
        if source.dim() != len(entry.source_ranges) or \
                any(stop > n for (_, stop), n in zip(entry.source_ranges, source.shape)):
            raise ValueError(f"{entry.source_name} has shape {tuple(source.shape)}; "
                             f"the plan reads {entry.source_ranges}")
        view = source[entry.source_slices]
        if out is not None:
            target = out[entry.name]
            if tuple(target.shape) != entry.shape:
                raise ValueError(f"out[{entry.name!r}] has shape {tuple(target.shape)}; the plan gives {entry.shape}")
            result[entry.name] = target.copy_(view)
        else:
            made[key] = torch.empty(view.shape, dtype=dtype or view.dtype, device=device or view.device).copy_(view)
            result[entry.name] = made[key]
    return result


def materialize_rank(plan: WeightPlan, global_rank: int, full: Mapping[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return materialize_shard(plan.for_global_rank(global_rank), full, dtype=dtype)


def assemble_full(plan: WeightPlan, shards: Sequence[Mapping[str, torch.Tensor]],
                  out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of the plan: the full HF state dict from every local rank's shard dict (primary entries
    only), written into `out` when given, else into new tensors."""
    if len(shards) != len(plan.shards):
        raise ValueError(f"got {len(shards)} shard dicts; the plan has {len(plan.shards)} ranks")
    shapes = plan.full_shapes
    full: dict[str, torch.Tensor] = dict(out) if out is not None else {}
    for entries, shard in zip(plan.shards, shards):
        for entry in entries:
            if not entry.primary:
                continue
            piece = shard[entry.name]
            if entry.source_name not in full:
                full[entry.source_name] = torch.empty(shapes[entry.source_name], dtype=piece.dtype, device=piece.device)
            full[entry.source_name][entry.source_slices] = piece
    missing = sorted(set(shapes) - set(full))
    if missing:
        raise ValueError(f"shards do not cover {missing}")
    return full


# ---- KV ------------------------------------------------------------------------------------------------
# Local KV tensors share the host store's head-major order:  kv: [layers, 2, kv_heads, tokens, head_dim]
# where a rank's tensor spans only its owned (layers, heads) rectangle.

def apply_kv_moves(moves: Iterable[KVMove], sources: Mapping[int, torch.Tensor],
                   destinations: Mapping[int, torch.Tensor]) -> None:
    """Copy every move whose source and destination ranks are both present (others are skipped)."""
    for move in moves:
        if move.src_rank not in sources or move.dst_rank not in destinations:
            continue
        src_layers, src_heads = move.src_slices
        dst_layers, dst_heads = move.dst_slices
        destinations[move.dst_rank][dst_layers, :, dst_heads].copy_(sources[move.src_rank][src_layers, :, src_heads])


def write_to_store(store: torch.Tensor, owned: KVRect, local: torch.Tensor) -> None:
    """store: [L, 2, kv_heads, T, D] (full); local: [len(owned.layers), 2, len(owned.heads), T, D]."""
    layers, heads = owned.slices
    store[layers, :, heads].copy_(local)


def read_from_store(store: torch.Tensor, owned: KVRect, out: torch.Tensor | None = None) -> torch.Tensor:
    """The `owned` rectangle of a full store tensor, copied into `out` (or a new contiguous tensor)."""
    layers, heads = owned.slices
    view = store[layers, :, heads]
    if out is None:
        return view.clone(memory_format=torch.contiguous_format)
    return out.copy_(view)
