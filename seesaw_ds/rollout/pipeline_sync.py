"""Bring a pipeline-parallel trainer's stage shards to the ranks that write the rollout weights.

A DeepSpeed `PipelineModule` holds each stage's layers only on that stage's ranks. Every training rank
lists its own parameters under Hugging Face names (its manifest); the manifests are all-gathered, and every
rank replays the same pure plan over them:

    owner of a name   = the lowest rank that holds it (data-parallel replicas and tied copies are equal)
    bucket            = consecutive names of one owner, at most `bucket_bytes` (a larger tensor alone)
    a bucket moves    = packed into one byte buffer on its owner, broadcast from the owner over the
                        training ranks' default group, unless no writer needs it (the owner is the only
                        writer): then the owner writes from its own parameters

so each writer (rank 0 of a node-shared master copy, else every rank) sees every parameter once, and the
extra memory of a sync is one bucket.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from seesaw_ds.rollout.sync import buckets

# a manifest row: (Hugging Face name, shape, dtype name)
Row = tuple[str, tuple[int, ...], str]


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int            # bytes into the bucket's buffer
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    owner: int             # global rank that holds these parameters
    slots: tuple[Slot, ...]
    moves: bool            # broadcast (some writer is not the owner), else the owner writes locally

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def row_bytes(row: Row) -> int:
    return math.prod(row[1]) * torch.empty((), dtype=dtype_of(row[2])).element_size()


def plan_buckets(manifests: list[list[Row]], writers: list[bool], bucket_bytes: int) -> list[Bucket]:
    """Pure: every rank's manifest (index = rank) and writer flag -> the buckets every rank replays."""
    owners: dict[str, int] = {}
    rows: dict[int, list[Row]] = {}
    for rank, manifest in enumerate(manifests):
        for row in manifest:
            if row[0] not in owners:
                owners[row[0]] = rank
                rows.setdefault(rank, []).append(row)
    out = []
    for owner in sorted(rows):
        moves = any(w and r != owner for r, w in enumerate(writers))
        for group in buckets(rows[owner], bucket_bytes, row_bytes):
            slots, offset = [], 0
            for row in group:
                n = row_bytes(row)
                slots.append(Slot(row[0], tuple(row[1]), row[2], offset, n))
                offset += n
            out.append(Bucket(owner, tuple(slots), moves))
    return out


def manifest_of(named: list[tuple[str, torch.nn.Parameter]]) -> list[Row]:
    return [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in named]


def gather_manifests(local, writer: bool) -> tuple[list, list[bool]]:
    """All-gather each rank's (manifest or error text) and writer flag over the default group. Collective."""
    import torch.distributed as dist
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, (local, writer))
    return [m for m, _ in box], [w for _, w in box]


class BucketStream:
    """Yields each bucket's `(name, tensor)` pairs on the ranks that should write them (an empty list
    elsewhere), running the broadcasts. Collective: every training rank iterates it to the end.
    `seconds` is the time spent packing and broadcasting."""

    def __init__(self, plan: list[Bucket], local: dict[str, torch.Tensor], rank: int, writer: bool):
        self.plan, self.local, self.rank, self.writer = plan, local, rank, writer
        self.seconds = 0.0
        self.error: BaseException | None = None      # the owner's packing failure (it still broadcasts)

    def __iter__(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        import torch.distributed as dist
        for bucket in self.plan:
            mine = bucket.owner == self.rank
            if mine and self.writer:                 # the owner writes from its own parameters
                if bucket.moves:
                    self._move(bucket, dist)
                yield [(s.name, self.local[s.name]) for s in bucket.slots]
                continue
            if not bucket.moves:
                yield []
                continue
            buf = self._move(bucket, dist)
            if not self.writer:
                yield []
                continue
            yield [(s.name, buf[s.offset:s.offset + s.nbytes].view(dtype_of(s.dtype)).view(s.shape))
                   for s in bucket.slots]

    def _move(self, bucket: Bucket, dist) -> torch.Tensor:
        """buf: [bucket bytes] uint8, filled on the owner and broadcast from it."""
        t0 = time.perf_counter()
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self._device())
        if bucket.owner == self.rank:
            try:
                for s in bucket.slots:
                    src = self.local[s.name].detach().contiguous().reshape(-1)
                    buf[s.offset:s.offset + s.nbytes].copy_(src.view(torch.uint8))
            except Exception as err:  # noqa: BLE001 - agreed on after the stream, then re-raised
                self.error = self.error or err
        dist.broadcast(buf, src=bucket.owner)
        self.seconds += time.perf_counter() - t0
        return buf

    def _device(self):
        for t in self.local.values():
            return t.device
        from deepspeed.accelerator import get_accelerator
        return get_accelerator().current_device_name()
