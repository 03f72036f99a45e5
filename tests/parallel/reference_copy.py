"""Test-local reference executors of the plans: cut a full state dict into a rank's shard (copies) and put
the shards back together. The package binds views instead (`bind_views`); these copies let the tests check
that the plans tile the checkpoint and round-trip, independently of any module."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from seesaw_ds.parallel.weight_plan import ShardEntry, WeightPlan


def materialize_shard(entries: Iterable[ShardEntry], full: Mapping[str, torch.Tensor],
                      out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A rank's shard dict: each entry's slice of `full` copied into a new tensor (or into `out[name]`)."""
    result = {}
    for entry in entries:
        source = full[entry.source_name]
        assert source.dim() == len(entry.source_ranges)
        assert all(stop <= n for (_, stop), n in zip(entry.source_ranges, source.shape)), entry
        view = source[entry.source_slices]
        if out is not None:
            assert tuple(out[entry.name].shape) == entry.shape
            result[entry.name] = out[entry.name].copy_(view)
        else:
            result[entry.name] = view.clone(memory_format=torch.contiguous_format)
    return result


def assemble_full(plan: WeightPlan, shards: Sequence[Mapping[str, torch.Tensor]],
                  out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict written into `out` from every local rank's shard (primary entries only)."""
    assert len(shards) == len(plan.shards)
    full = dict(out)
    for entries, shard in zip(plan.shards, shards):
        for entry in entries:
            if entry.primary:
                full[entry.source_name][entry.source_slices] = shard[entry.name]
    return full
