"""The engine's communicator: the few collectives a replica's ranks need to step in lockstep.

One process runs the same engine with `NullComm` (a world of one: every collective is the identity);
the ranks of a replica use `TorchComm` over the default process group (gloo on CPUs, NCCL on GPUs).
Model code never calls these; only the engine loop, the builder and the tiers do.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class NullComm:
    """A world of one process."""
    rank, world_size = 0, 1

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int) -> Any:
        return obj

    def all_reduce(self, value: int, op: str = "sum") -> int:
        return int(value)

    def barrier(self) -> None:
        pass

    def on_rank0_then_all(self, fn: Callable[[], Any]) -> Any:
        return fn()


class TorchComm(NullComm):
    """Every rank of the default process group (one replica spans the whole world)."""

    def __init__(self):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised process group (init_distributed first)")
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj: Any, src: int) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, value: int, op: str = "sum") -> int:
        ops = {"sum": self._dist.ReduceOp.SUM, "min": self._dist.ReduceOp.MIN, "max": self._dist.ReduceOp.MAX}
        t = torch.tensor([int(value)], dtype=torch.long)
        self._dist.all_reduce(t, op=ops[op])
        return int(t)

    def barrier(self) -> None:
        self._dist.barrier()

    def on_rank0_then_all(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 first (a one-time conversion, a file it creates), then on the others, which reuse
        its result. An error on rank 0 reaches the others as a RuntimeError instead of a hang."""
        ok, result = True, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others hear of it
                ok, result = False, err
        status = self.broadcast_object(ok if self.rank == 0 else None, src=0)
        if self.rank == 0:
            if not ok:
                raise result
            return result
        if not status:
            raise RuntimeError("rank 0 failed while preparing a shared resource (its error is printed there)")
        return fn()
