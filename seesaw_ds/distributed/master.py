"""One host master copy of the weights per node, shared by its ranks; every layout's modules are views of it.

The master copy is a safetensors file in the run dtype, converted once into the cache. Its name carries
the checkpoint's content key (see `checkpoint_key`), so a checkpoint overwritten in place is converted
again instead of silently serving the old weights; converting removes the stale masters of that folder.
Every rank maps the file read-only; the OS page cache holds its bytes once per node. Shards of any layout
are views into it: a pipeline stage's whole layers, or a tensor-parallel rank's row or column slice (a
column slice of a row-major matrix is still a valid BLAS operand, leading dimension = full width).

Weight updates (`write`) need a writable master: `writable_copy` clones it in memory (one process) or
into one private shared-memory file that all ranks of the node map (see master_io.py); the engine then
re-points every module's views at the copy (`parallel.copy.bind_views`). The cached file never changes.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import uuid
from collections.abc import Iterable, Mapping

import torch

from seesaw_ds.distributed import master_io as io
from seesaw_ds.distributed.master_io import (checkpoint_key, map_safetensors, master_path,  # noqa: F401
                                             prepare_master)
from seesaw_ds.parallel.weight_plan import EMBED, LM_HEAD

__all__ = ["MasterWeights", "build_hf_model", "checkpoint_key", "map_safetensors", "master_path", "prepare_master"]


def _file_key(path: str) -> str:
    st = os.stat(path)
    h = hashlib.sha1(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(io.header_bytes(path))
    return h.hexdigest()[:16]


class MasterWeights:
    """Tensors of the whole model keyed by Hugging Face parameter name.

    `MasterWeights(path)` maps a master file read-only. `writable_copy` and `from_tensors` give writable
    ones; `shared` says whether the ranks of the node map the same memory (else each rank holds its own).
    `content_key` names the bytes: the checkpoint's key, and a fresh one after every `write`.
    """

    def __init__(self, path: str):
        self.path: str | None = path
        self.tensors = io.map_safetensors(path)
        self.content_key = io.read_metadata(path).get("content_key") or _file_key(path)
        self.writable, self.shared = False, True
        self._buffers: list[mmap.mmap] = []
        self._updates = 0

    @classmethod
    def _wrap(cls, tensors: dict[str, torch.Tensor], key: str, shared: bool, buffers=()) -> "MasterWeights":
        self = cls.__new__(cls)
        self.path, self.tensors, self.content_key = None, tensors, key
        self.writable, self.shared, self._buffers, self._updates = True, shared, list(buffers), 0
        return self

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], content_key: str | None = None) -> "MasterWeights":
        """Wrap in-memory tensors (a model built in memory) as a writable master, each rank its own."""
        return cls._wrap(dict(tensors), content_key or f"memory-{uuid.uuid4().hex[:12]}", shared=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def describe(self) -> str:
        return self.path or f"writable master copy {self.content_key}"

    # ---- a writable copy -----------------------------------------------------------------------------
    def writable_copy(self, comm, tag: str = "") -> "MasterWeights":
        """A writable master with the same bytes and key. One process: in-memory clones. Several ranks (one
        node): one private /dev/shm file that every rank maps MAP_SHARED and rank 0 unlinks once all have
        mapped it. Collective: every rank of `comm` calls it."""
        if comm.world_size == 1:
            return self._wrap({n: t.clone() for n, t in self.tensors.items()}, self.content_key, shared=False)
        offsets, nbytes = io.flat_layout(self.tensors)
        path, buf, error, created = None, None, None, False
        if comm.rank == 0:
            try:
                path = io.shm_path(tag)
                fd = io.create_shm_file(path, nbytes)
                created = True
                try:
                    buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)
                for name, t in io.tensors_over(buf, self.tensors, offsets).items():
                    t.copy_(self.tensors[name])
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others hear of it
                error = err
                if created:
                    io.unlink_shm_file(path)
        told = comm.broadcast_object((path, None if error is None else f"{type(error).__name__}: {error}"), src=0)
        if error is not None:
            raise error
        if told[1] is not None:
            raise RuntimeError(f"rank 0 could not create the writable master copy: {told[1]}")
        mapped = True
        try:
            if comm.rank != 0:
                try:
                    buf = io.map_shared(told[0], nbytes)
                except OSError:
                    mapped = False
                    raise
        finally:
            try:
                everyone = comm.all_reduce(int(mapped), "min")    # every rank has mapped it (or failed)
            finally:
                if comm.rank == 0:
                    io.unlink_shm_file(told[0])                   # the mappings keep the memory alive
                comm.barrier()                                    # NOTE: then the name is gone on every rank
        if not everyone:
            raise RuntimeError("a rank could not map the writable master copy (its error is printed there)")
        return self._wrap(io.tensors_over(buf, self.tensors, offsets), self.content_key, shared=True,
                          buffers=[buf])

    # ---- weight updates ------------------------------------------------------------------------------
    def _target(self, name: str, tensor) -> str:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
        target = name
        if name not in self.tensors:
            if name == LM_HEAD and EMBED in self.tensors:
                target = EMBED                     # tied embeddings: the head is the embedding
            else:
                raise ValueError(f"unknown weight {name!r}: the master copy has no such tensor "
                                 f"(Hugging Face parameter names expected, e.g. {next(iter(self.tensors), '')!r})")
        want = tuple(self.tensors[target].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}; the master copy's {target!r} "
                             f"has shape {want}")
        return target

    def _check_tied(self, name: str, target: str, tensor: torch.Tensor, given: Mapping[str, torch.Tensor]) -> None:
        other = given.get(target)
        if other is None or other is tensor or (other.data_ptr() == tensor.data_ptr() and
                                                other.dtype == tensor.dtype and other.stride() == tensor.stride()):
            return
        dtype = self.tensors[target].dtype
        if not torch.equal(other.detach().to("cpu", dtype), tensor.detach().to("cpu", dtype)):
            raise ValueError(f"weight {name!r} differs from {target!r} given in the same update; the model "
                             f"ties them, so they must be equal")

    def _write_local(self, weights, written: dict[str, torch.Tensor]) -> None:
        if weights is None:
            raise ValueError("rank 0 must pass the weights to write (a Mapping or (name, tensor) pairs)")
        if isinstance(weights, Mapping):           # validate everything before writing anything
            seen: dict[str, torch.Tensor] = {}
            for name, t in weights.items():
                target = self._target(name, t)
                self._check_tied(name, target, t, seen)
                seen.setdefault(target, t)
            pairs: Iterable = weights.items()
        else:                                      # a stream: each pair is validated before it is written
            pairs = weights
        with torch.no_grad():
            for name, t in pairs:
                target = self._target(name, t)
                if target in written:              # the tied head after the embedding (or the reverse)
                    if not isinstance(weights, Mapping):
                        self._check_tied(name, target, t, written)
                    continue
                self.tensors[target].copy_(t.detach())
                written[target] = t

    def write(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None,
              comm) -> int:
        """Write new weights (Hugging Face names, e.g. a trainer's `state_dict()` or `named_parameters()`),
        cast to the master's dtype. Only rank 0's `weights` are read (others may pass None); every rank
        calls it and returns once the bytes are visible to all. Returns the bytes written; afterwards
        `content_key` is a fresh key. A Mapping is validated whole first (unknown name or wrong shape:
        ValueError, nothing written); a stream of pairs is validated pair by pair."""
        if not self.writable:
            raise RuntimeError(f"the master copy {self.describe()} is read-only (a cached file every rank maps); "
                               f"take `writable_copy(comm, tag)` first and bind the modules to it")
        written: dict[str, torch.Tensor] = {}
        error = None
        if comm.rank == 0:
            try:
                self._write_local(weights, written)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others hear of it
                error = err
        names = list(written)
        key = f"{self.content_key.split('.updated-')[0]}.updated-{self._updates + 1}-{uuid.uuid4().hex[:8]}"
        if comm.world_size > 1:
            message = None if error is None else f"{type(error).__name__}: {error}"
            names, key, message = comm.broadcast_object((names, key, message), src=0)
            if not self.shared:                    # each rank holds its own copy: send it rank 0's bytes
                for name in names:
                    comm.broadcast(self.tensors[name], src=0)
            comm.barrier()
            if error is None and message is not None:
                error = RuntimeError(f"rank 0 failed to write the weights: {message}")
        if names:                                  # even a partial write changed the bytes
            self.content_key, self._updates = key, self._updates + 1
        if error is not None:
            raise error
        return sum(self.tensors[n].numel() * self.tensors[n].element_size() for n in names)

    def close(self) -> None:
        """Drop this object's tensors; the memory goes once no module views it any more."""
        self.tensors, self._buffers = {}, []


def build_hf_model(folder: str, master: MasterWeights, dtype: torch.dtype):
    """A fresh HF model whose parameters are views of the master copy (no weight bytes allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        source = name if name in master else None
        if source is None and name == LM_HEAD and config.tie_word_embeddings:
            source = EMBED
        if source is None:
            raise KeyError(f"master copy {master.describe()} has no tensor for parameter {name}")
        state[name] = master[source]
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
