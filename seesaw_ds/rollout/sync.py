"""Move a DeepSpeed training engine's current parameters into a rollout engine's weights, without a file.

    trainer params --(ZeRO-3: GatheredParameters over a bucket)--> full tensors --copy_--> master copy

The rollout engine's modules are views of one master copy (distributed/master.py); a sync writes every
parameter into a *staging* master and, once every rank has written all of it, re-points every module's views
at the staging copy (`bind_views`: no bytes move) and keeps the old one as the next staging buffer. A sync
that fails part-way therefore leaves the previous weights in place. `atomic=False` writes straight into the
live copy instead (half the memory; a failure leaves mixed weights).

ZeRO stages 0-2 hold whole parameters on every rank: they are copied as they are. ZeRO-3 parameters are
partitioned: they are gathered `bucket_bytes` at a time (the bucket's full tensors exist on every rank only
inside the `GatheredParameters` block), which bounds the extra memory of a sync to one bucket.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from seesaw_ds.parallel.copy import bind_views
from seesaw_ds.parallel.weight_plan import EMBED, LM_HEAD

log = logging.getLogger("seesaw_ds")

DEFAULT_BUCKET_BYTES = 64 << 20


@dataclass
class SyncReport:
    seconds: float            # the whole sync, gathers included
    gather_seconds: float     # inside ZeRO-3 gathers (0 for whole parameters)
    nbytes: int               # bytes written into the master copy on this rank
    num_params: int
    buckets: int

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {f"{prefix}seconds": self.seconds, f"{prefix}gather_seconds": self.gather_seconds,
                f"{prefix}bytes": float(self.nbytes), f"{prefix}buckets": float(self.buckets)}


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: its full tensor exists only inside a gather."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def strip_wrapper_prefix(name: str) -> str:
    """Trainer names -> Hugging Face names: drop wrapper prefixes (`module.`, `_orig_mod.`)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def trainer_parameters(module: torch.nn.Module, name_map: Callable[[str], str | None] = strip_wrapper_prefix
                       ) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainer's parameters under Hugging Face names, each storage once (a tied head is the embedding);
    `name_map` returning None drops a parameter (e.g. a value head)."""
    if type(module).__name__ == "PipelineModule":
        raise NotImplementedError("syncing from a PipelineModule training engine is not supported yet: "
                                  "train an nn.Module (ZeRO 0-3)")
    out = []
    for name, param in module.named_parameters():          # remove_duplicate: tied weights once
        mapped = name_map(name)
        if mapped is not None:
            out.append((mapped, param))
    return out


def buckets(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int
            ) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive groups of parameters of at most `bucket_bytes` full bytes (a larger parameter alone)."""
    group, size = [], 0
    for name, p in named:
        n = 1
        for d in full_shape(p):
            n *= d
        n *= p.element_size()
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, p))
        size += n
    if group:
        yield group


class WeightSync:
    """Writes a trainer's parameters into an inference engine's `WeightViews` (engine.weights).

    Collective over the engine's communicator *and* the trainer's ranks: every training rank calls `sync`
    (ZeRO-3 gathers are collective). Writers: rank 0 of a node-shared master copy, else every rank."""

    def __init__(self, weights, comm, bucket_bytes: int = DEFAULT_BUCKET_BYTES, atomic: bool = True):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.weights, self.comm = weights, comm
        self.bucket_bytes, self.atomic = int(bucket_bytes), atomic
        self._staging = None
        self.history: list[SyncReport] = []

    def _target_name(self, master, name: str, shape: tuple[int, ...]) -> str:
        target = name
        if name not in master:
            if name == LM_HEAD and EMBED in master:
                target = EMBED
            else:
                raise ValueError(f"trainer parameter {name!r} has no tensor in the rollout weights (Hugging Face "
                                 f"names expected; pass name_map= to translate or drop it)")
        if tuple(master[target].shape) != shape:
            raise ValueError(f"trainer parameter {name!r} has shape {shape}; the rollout's {target!r} has "
                             f"shape {tuple(master[target].shape)}")
        return target

    def _destination(self):
        """The master copy this sync writes: a staging copy (atomic) or the live one, made writable."""
        live = self.weights.master
        if not self.atomic:
            if not live.writable:
                self.weights.update({}, self.comm)          # takes the writable copy and re-binds the views
            return self.weights.master
        if self._staging is None or self._staging is live:
            self._staging = live.writable_copy(self.comm, tag=f"staging-{uuid.uuid4().hex[:8]}")
        return self._staging

    def sync(self, module: torch.nn.Module, name_map: Callable[[str], str | None] = strip_wrapper_prefix
             ) -> SyncReport:
        t0 = time.perf_counter()
        named = trainer_parameters(module, name_map)
        dest = self._destination()
        targets = [self._target_name(dest, n, full_shape(p)) for n, p in named]   # all checked before any gather
        read = {e.source_name for _, entries in self.weights.bindings for e in entries}   # what modules view
        missing = sorted(read - set(targets))
        if missing:          # a staged copy must be written whole, or it would serve older weights
            raise ValueError(f"the trainer has no parameter for the rollout weights {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        writer = self.comm.rank == 0 or not dest.shared
        nbytes, gather_s, count, done = 0, 0.0, 0, set()
        by_name = dict(zip((n for n, _ in named), targets))
        error = None                       # a writer's failure: keep joining the gathers, write no more
        with torch.no_grad():
            for group in buckets(named, self.bucket_bytes):
                count += 1
                g0 = time.perf_counter()
                with _gathered([p for _, p in group]):
                    gather_s += time.perf_counter() - g0
                    if not writer or error is not None:
                        continue
                    try:
                        for name, p in group:
                            target = by_name[name]
                            if target not in done:
                                dst = dest[target]
                                dst.copy_(p.data.reshape(dst.shape))
                                done.add(target)
                                nbytes += dst.numel() * dst.element_size()
                    except Exception as err:  # noqa: BLE001 - agreed on below, then re-raised
                        error = err
        ok = self.comm.all_reduce(int(error is None), "min") if self.comm.world_size > 1 else int(error is None)
        if error is not None:
            raise error
        if not ok:
            raise RuntimeError("weight sync failed on another rank; the previous weights are kept")
        dest.content_key = f"{dest.content_key.split('.sync-')[0]}.sync-{uuid.uuid4().hex[:8]}"
        if self.atomic:
            old = self.weights.master
            for module_, entries in self.weights.bindings:
                bind_views(module_, entries, dest)
            self.weights.master = dest
            self._staging = old if old.writable else None
        report = SyncReport(time.perf_counter() - t0, gather_s, nbytes, len(done), count)
        self.history.append(report)
        if self.comm.rank == 0:
            log.info("weight sync: %.1f MB in %.3f s (%d buckets, %.3f s gathering)",
                     nbytes / 1e6, report.seconds, count, gather_s)
        return report

    def close(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None


class _gathered:
    """`deepspeed.zero.GatheredParameters` over the partitioned ones of `params` (read-only), else nothing."""

    def __init__(self, params):
        self.params = [p for p in params if is_partitioned(p)]
        self.ctx = None

    def __enter__(self):
        if self.params:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
