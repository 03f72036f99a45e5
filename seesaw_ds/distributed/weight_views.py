"""Every module of every layout on this rank, as views of one master copy of the weights.

A binding is (module, the weight plan's entries for it): the full model of one process or a pipeline stage
(whole tensors) and an AutoTP module (row or column slices). `update` writes new weights into the master
copy; the first update swaps a shared, read-only master file for a private writable copy and re-binds every
module's views to it (`bind_views`, the weight plan's executor), so no layout keeps the old weights.
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping

import torch

from seesaw_ds.parallel.copy import bind_views
from seesaw_ds.parallel.weight_plan import ShardEntry


class WeightViews:
    def __init__(self, master, bindings: list[tuple[torch.nn.Module, tuple[ShardEntry, ...]]] = ()):
        self.master = master
        self.bindings = list(bindings)

    def bind(self, module: torch.nn.Module, entries: tuple[ShardEntry, ...]) -> int:
        """Point `module`'s parameters at the master copy and keep the binding; returns bytes released."""
        released = bind_views(module, entries, self.master)
        self.bindings.append((module, entries))
        return released

    def update(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None,
               comm) -> int:
        """Write `weights` (rank 0's) into the master copy; returns the bytes written."""
        if not self.master.writable:
            self.master = self.master.writable_copy(comm, tag=f"{int(time.time())}")
            for module, entries in self.bindings:
                bind_views(module, entries, self.master)
        return self.master.write(weights, comm)

    @property
    def content_key(self) -> str:
        return self.master.content_key

    def close(self) -> None:
        """Forget the bindings and drop the master's tensors (a private copy's memory goes with the modules)."""
        self.bindings = []
        self.master.close()
