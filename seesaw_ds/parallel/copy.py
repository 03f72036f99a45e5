"""The weight plan's executor: point a module's parameters at views of the master copy.

Every layout's module on a rank (the full model, a pipeline stage, an AutoTP shard) holds no weight bytes
of its own: each parameter named by a `ShardEntry` becomes `master[entry.source_name][entry.source_slices]`.
Binding again after the master copy is replaced (a writable copy for weight updates) re-points them all.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from seesaw_ds.parallel.weight_plan import ShardEntry


def bind_views(module: torch.nn.Module, entries: Iterable[ShardEntry], master: Mapping[str, torch.Tensor],
               check_equal: bool = False) -> int:
    """Point every parameter of `module` named by an entry at `master[source_name][source_slices]`.

    `master` is anything indexable by Hugging Face name (`MasterWeights`, a state dict). Shapes and dtypes
    must match the plan (ValueError otherwise); with `check_equal` the parameter's current values must
    also equal the view (e.g. AutoTP's own shard copies at build time). Tied parameters (one Parameter
    under two names) are re-pointed once. Returns the bytes of parameters moved off other storage.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    moved = 0
    for entry in entries:
        param = params.get(entry.name)
        if param is None:
            raise KeyError(f"the weight plan names {entry.name!r}, which {type(module).__name__} does not have")
        try:
            source = master[entry.source_name]
        except KeyError:
            raise KeyError(f"the master copy has no tensor {entry.source_name!r} (for {entry.name!r})") from None
        if source.dim() != len(entry.source_ranges) or \
                any(stop > n for (_, stop), n in zip(entry.source_ranges, source.shape)):
            raise ValueError(f"{entry.source_name} has shape {tuple(source.shape)}; the plan reads "
                             f"{entry.source_ranges} for {entry.name}")
        view = source[entry.source_slices]
        if param.shape != view.shape or param.dtype != view.dtype:
            raise ValueError(f"parameter {entry.name} is {tuple(param.shape)} {param.dtype}; the plan's view of "
                             f"{entry.source_name} is {tuple(view.shape)} {view.dtype}")
        if param.data_ptr() == view.data_ptr() and param.stride() == view.stride():
            continue                                   # already this view (or a tied name bound just before)
        if check_equal and not torch.equal(param.data, view):
            raise ValueError(f"parameter {entry.name} differs from its slice of {entry.source_name}")
        moved += param.numel() * param.element_size()
        param.data = view
    return moved
