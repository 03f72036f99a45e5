"""The engine's communicator: the few collectives a replica's ranks need to step in lockstep.

One process runs the same engine with `NullComm` (a world of one: every collective is the identity);
the ranks of a replica use `TorchComm` over the default process group (gloo on CPUs, NCCL on GPUs).
Model code never calls these; only the engine loop, the builder, the tiers and the job loop do.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


class NullComm:
    """A world of one process."""
    rank, world_size = 0, 1

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

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

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, value: int, op: str = "sum") -> int:
        ops = {"sum": self._dist.ReduceOp.SUM, "min": self._dist.ReduceOp.MIN, "max": self._dist.ReduceOp.MAX}
        t = torch.tensor([int(value)], dtype=torch.long)
        self._dist.all_reduce(t, op=ops[op])
        return int(t)

    def barrier(self) -> None:
        self._dist.barrier()

    def on_rank0_then_all(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 first (a one-time conversion, a file it creates), then on the others, which reuse
        its result. Rank 0's error is raised on every rank (the same exception where it can be sent, else a
        RuntimeError) instead of a hang. However long fn() takes, no collective waits longer than a
        heartbeat (`rank0_heart_beaten`), so the process group's timeout bounds only a real hang."""
        ok, result = rank0_heart_beaten(self, fn)
        if self.rank == 0:
            if not ok:
                raise result
            return result
        if not ok:
            raise result if isinstance(result, BaseException) else RuntimeError(
                f"rank 0 failed while preparing a shared resource: {result}")
        return fn()


def heartbeat_seconds() -> float:
    """How often rank 0 tells the others it is still busy: a quarter of the collective timeout, at most 10 s."""
    from seesaw_ds.distributed.liveness import collective_timeout
    return min(10.0, collective_timeout().total_seconds() / 4)


def rank0_heart_beaten(comm, fn: Callable[[], Any], send_result: bool = False) -> tuple[bool, Any]:
    """Run fn() on rank 0 of `comm` (anything with rank and broadcast_object) while every other rank waits
    in a broadcast that rank 0 repeats every `heartbeat_seconds()`: (ok, result or exception) on rank 0;
    on the others (ok, rank 0's result if `send_result` else None, or its exception or the exception's
    text). Collective."""
    import threading
    if comm.rank != 0:
        return _await_rank0(comm)
    box: list = [False, None]

    def work():
        try:
            box[:] = [True, fn()]
        except BaseException as err:  # noqa: BLE001 - handed to the caller, and to the other ranks
            box[:] = [False, err]

    worker = threading.Thread(target=work, name="seesaw-rank0-work", daemon=True)
    worker.start()
    beat = heartbeat_seconds()
    while True:
        worker.join(beat)
        if worker.is_alive():
            comm.broadcast_object("busy", src=0)
            continue
        ok, result = box
        comm.broadcast_object((True, result if send_result else None) if ok else (False, sendable(result)), src=0)
        return ok, result


def _await_rank0(comm) -> tuple[bool, Any]:
    """The waiting side of a heartbeat: rank 0's final status, after any number of "busy" beats."""
    while True:
        status = comm.broadcast_object(None, src=0)
        if status != "busy":
            return status


@contextlib.contextmanager
def rank0_beating(comm):
    """Rank 0 runs the body on this thread (without collectives on `comm`) while a thread tells the other
    ranks, waiting in `wait_for_rank0`, every `heartbeat_seconds()` that it is busy; then the body's outcome
    (done, or its exception, which is re-raised here)."""
    import threading
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_seconds()):
            comm.broadcast_object("busy", src=0)
    beater = threading.Thread(target=beat, name="seesaw-heartbeat", daemon=True)
    beater.start()
    outcome: tuple[bool, Any] = (True, None)
    try:
        yield
    except BaseException as err:
        outcome = (False, sendable(err))
        raise
    finally:
        stop.set()
        beater.join()
        comm.broadcast_object(outcome, src=0)


def wait_for_rank0(comm) -> None:
    """The other ranks' side of `rank0_beating`: return when rank 0's body is done; raise its error."""
    ok, result = _await_rank0(comm)
    if not ok:
        raise rank0_error(result)


def rank0_error(result: Any) -> BaseException:
    """Rank 0's error as another rank raises it: the exception itself, or a RuntimeError with its text."""
    return result if isinstance(result, BaseException) else RuntimeError(f"rank 0 failed: {result}")


def sendable(err: BaseException) -> Any:
    """The exception itself when it survives pickling, else its text."""
    import pickle
    try:
        copy = pickle.loads(pickle.dumps(err))
        return copy if type(copy) is type(err) and str(copy) == str(err) else f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - any pickling failure: send the text
        return f"{type(err).__name__}: {err}"
