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

A pipeline-parallel trainer (DeepSpeed `PipelineModule`, ZeRO 0-1) holds each stage's layers only on its
own ranks: its names go through the module's name map (`pipeline_policy.PipelineNames`, or the caller's)
and each stage's owner broadcasts its parameters, bucketed, to the writers (pipeline_sync.py).
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch

from seesaw_ds.parallel.copy import bind_views
from seesaw_ds.parallel.weight_plan import EMBED, LM_HEAD

log = logging.getLogger("seesaw_ds")
T = TypeVar("T")

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


def is_pipeline(module: torch.nn.Module) -> bool:
    """A DeepSpeed `PipelineModule`: this rank holds only its stage's layers."""
    try:
        from deepspeed.pipe import PipelineModule
    except ImportError:
        return False
    return isinstance(module, PipelineModule)


def pipeline_name_map(module: torch.nn.Module, name_map: Callable[[str], str | None]
                      ) -> Callable[[str], str | None]:
    """A PipelineModule's names -> Hugging Face names: the caller's `name_map`, else the one
    `pipeline_policy` attached to the module (`hf_name_map`)."""
    if name_map is not strip_wrapper_prefix:
        return name_map
    attached = getattr(module, "hf_name_map", None)
    if attached is None:
        raise ValueError("this PipelineModule has no Hugging Face name map: build it with "
                         "seesaw_ds.rollout.pipeline_policy, or pass name_map= (a PipelineModule name such as "
                         "'3.layer.self_attn.q_proj.weight' -> 'model.layers.2.self_attn.q_proj.weight', None "
                         "to drop)")
    return attached


def trainer_parameters(module: torch.nn.Module, name_map: Callable[[str], str | None] = strip_wrapper_prefix
                       ) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainer's parameters on this rank under Hugging Face names, each storage once (a tied head is the
    embedding); `name_map` returning None drops a parameter (e.g. a value head). A PipelineModule gives
    only this rank's stage (see `pipeline_name_map`)."""
    if is_pipeline(module):
        name_map = pipeline_name_map(module, name_map)
    out = []
    for name, param in module.named_parameters():          # remove_duplicate: tied weights once
        mapped = name_map(name)
        if mapped is not None:
            out.append((mapped, param))
    return out


def full_bytes(named_param: tuple[str, torch.nn.Parameter]) -> int:
    """Bytes of a (name, parameter)'s full tensor (a ZeRO-3 parameter's, not its partition's)."""
    return math.prod(full_shape(named_param[1])) * named_param[1].element_size()


def buckets(items: list[T], bucket_bytes: int, nbytes: Callable[[T], int] = full_bytes) -> Iterator[list[T]]:
    """Consecutive groups of `items` of at most `bucket_bytes` bytes each (a larger item alone); by default
    items are (name, parameter) pairs measured by their full tensors."""
    group, size = [], 0
    for item in items:
        n = nbytes(item)
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append(item)
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

    def _check_targets(self, dest, rows: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
        """Trainer name -> master name, every name and shape checked, before any byte moves."""
        by_name = {n: self._target_name(dest, n, shape) for n, shape in rows}
        read = {e.source_name for _, entries in self.weights.bindings for e in entries}   # what modules view
        missing = sorted(read - set(by_name.values()))
        if missing:          # a staged copy must be written whole, or it would serve older weights
            raise ValueError(f"the trainer has no parameter for the rollout weights {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}")
        return by_name

    @staticmethod
    def _write(dest, groups, by_name: dict[str, str], writer: bool):
        """Copy each group's (name, full tensor) into `dest`, each target once; on a failure keep iterating
        (the groups' collectives must run on every rank) but write no more. -> (bytes, done, groups, error)"""
        nbytes, count, done, error = 0, 0, set(), None
        with torch.no_grad():
            for group in groups:
                count += 1
                if not writer or error is not None:
                    continue
                try:
                    for name, tensor in group:
                        target = by_name[name]
                        if target not in done:
                            dst = dest[target]
                            dst.copy_(tensor.reshape(dst.shape))
                            done.add(target)
                            nbytes += dst.numel() * dst.element_size()
                except Exception as err:  # noqa: BLE001 - agreed on by the caller, then re-raised
                    error = err
        unwritten = sorted(set(by_name.values()) - done) if writer and error is None else []
        if unwritten:        # NOTE: a writer sees every target once, or the staged copy would mix versions
            error = RuntimeError(f"the sync never delivered {unwritten[:4]} to this writer")
        return nbytes, done, count, error

    def sync(self, module: torch.nn.Module, name_map: Callable[[str], str | None] = strip_wrapper_prefix
             ) -> SyncReport:
        if is_pipeline(module):
            return self._sync_pipeline(module, name_map)
        t0 = time.perf_counter()
        named = trainer_parameters(module, name_map)
        dest = self._destination()
        by_name = self._check_targets(dest, [(n, full_shape(p)) for n, p in named])
        writer = self.comm.rank == 0 or not dest.shared
        gather_s = [0.0]
        nbytes, done, count, error = self._write(dest, _zero_groups(named, self.bucket_bytes, gather_s),
                                                 by_name, writer)
        ok = self.comm.all_reduce(int(error is None), "min") if self.comm.world_size > 1 else int(error is None)
        return self._finish(dest, error, ok, SyncReport(0.0, gather_s[0], nbytes, len(done), count), t0)

    def _sync_pipeline(self, module, name_map) -> SyncReport:
        """Every training rank sends its stage's parameters to the writers (pipeline_sync.py). Collective
        over the training ranks' default group."""
        import torch.distributed as dist

        from seesaw_ds.rollout import pipeline_sync as ps
        t0 = time.perf_counter()
        named, own_error = [], None
        try:
            named = trainer_parameters(module, name_map)
            local = ps.manifest_of(named)
        except Exception as err:  # noqa: BLE001 - told to every rank before any bucket moves
            own_error, local = err, f"{type(err).__name__}: {err}"
        dest = self._destination()
        writer = self.comm.rank == 0 or not dest.shared
        manifests, writers = ps.gather_manifests(local, writer)
        failed = [(r, m) for r, m in enumerate(manifests) if isinstance(m, str)]
        if failed:
            if own_error is not None:
                raise own_error
            raise RuntimeError(f"training rank {failed[0][0]} could not list its parameters: {failed[0][1]}")
        plan = ps.plan_buckets(manifests, writers, self.bucket_bytes)
        by_name = self._check_targets(dest, [(s.name, s.shape) for b in plan for s in b.slots])   # same on all
        stream = ps.BucketStream(plan, {n: p.detach() for n, p in named}, dist.get_rank(), writer)
        nbytes, done, count, error = self._write(dest, stream, by_name, writer)
        error = error or stream.error
        flag = torch.tensor([int(error is None)], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return self._finish(dest, error, int(flag), SyncReport(0.0, stream.seconds, nbytes, len(done), count), t0)

    def _finish(self, dest, error, ok: int, report: SyncReport, t0: float) -> SyncReport:
        """Raise a failure (the previous weights stay bound), else bind every module to `dest`."""
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
        report.seconds = time.perf_counter() - t0
        self.history.append(report)
        if self.comm.rank == 0:
            log.info("weight sync: %.1f MB in %.3f s (%d buckets, %.3f s moving or gathering)",
                     report.nbytes / 1e6, report.seconds, report.buckets, report.gather_seconds)
        return report

    def close(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def _zero_groups(named, bucket_bytes: int, gather_s: list[float]):
    """Each bucket's (name, full tensor) pairs, valid until the next one (ZeRO-3: inside the bucket's gather,
    which every rank joins); time inside the gathers added to gather_s[0]."""
    for group in buckets(named, bucket_bytes):
        g0 = time.perf_counter()
        with _gathered([p for _, p in group]):
            gather_s[0] += time.perf_counter() - g0
            yield [(name, p.data) for name, p in group]


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
