"""Files of the master copy: the cached, content-keyed master file (conversion, atomic write, stale-file
removal), zero-copy safetensors maps, and the private shared-memory file of a writable copy.

Read-only masters are safetensors files mapped by every rank (the page cache holds them once per node).
A writable copy shared by the ranks of one node lives in a private file in /dev/shm: rank 0 creates it
exclusively (mode 0600, no symlink followed), every rank maps it MAP_SHARED, then rank 0 unlinks the name,
so the memory lives only as long as the mappings and a crash later leaves nothing behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import struct
import uuid
import warnings
from typing import Mapping

import torch

from seesaw_ds.distributed.node import node_key
from seesaw_ds.distributed.shm_buffers import forget, remember, shm_dir
from seesaw_ds.models.config import parse_dtype

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
SHM_PREFIX = "seesaw-master-"
_ALIGN = 64     # byte alignment of each tensor inside a shared writable copy


# ---- safetensors ---------------------------------------------------------------------------------------
def header_bytes(path: str) -> bytes:
    """The 8-byte length prefix and the JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        return prefix + f.read(struct.unpack("<Q", prefix)[0])


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` table of a safetensors file (empty when it has none)."""
    return json.loads(header_bytes(path)[8:]).get("__metadata__") or {}


def map_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Zero-copy, read-only tensors over a safetensors file (shared page cache across processes).

    The pages are mapped PROT_READ: writing through these tensors faults, so a master file can never be
    changed by accident (take a writable copy instead).
    """
    header_raw = header_bytes(path)
    header = json.loads(header_raw[8:])
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = len(header_raw)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        if end == start:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        with warnings.catch_warnings():      # torch warns about non-writable buffers: that is the point
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        out[name] = flat.view(info["shape"])
    return out


def write_safetensors_atomic(path: str, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` all or nothing: a private temp file beside it (mode 0600, created
    exclusively), fsync, rename, fsync of the folder.

    Readers never see a partial file; on any failure the temp file is removed and the error re-raised.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    remember(tmp)                  # a rank stopped mid-write removes it (shm_buffers.cleanup_on_stop)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for t in tensors.values():
                if t.numel():
                    f.write(memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:          # a full disk included: no model-sized temp file is left behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        forget(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---- private shared memory -----------------------------------------------------------------------------
def shm_path(tag: str = "") -> str:
    """A fresh, unguessable name in /dev/shm (the tag, sanitised, only helps a reader of `ls`)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(tag))[:32]
    return os.path.join(shm_dir(), f"{SHM_PREFIX}{safe + '-' if safe else ''}{node_key()}-{uuid.uuid4().hex}")


class ShmSpaceError(OSError):
    """A shared-memory file could not be reserved: the message names what asked for how much, and the free
    space of the folder (so a small /dev/shm ends in one clear line at start-up, not in SIGBUS later)."""


def create_shm_file(path: str, nbytes: int, purpose: str = "a writable copy of the weights",
                    remedy: str = "free memory") -> int:
    """Create `path` exclusively (an existing file or symlink there is refused: FileExistsError), mode 0600,
    and reserve `nbytes` (posix_fallocate, so a full /dev/shm fails here and not later with SIGBUS on a
    page fault: ShmSpaceError naming `purpose` and `remedy`). Returns the open read-write fd. On failure
    nothing is left at `path`; until the caller unlinks it, a stopped rank removes it (`remember`)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC, 0o600)
    remember(path)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
        return fd
    except BaseException as err:
        os.close(fd)
        os.unlink(path)
        forget(path)
        if isinstance(err, OSError):
            folder = os.path.dirname(path)
            st = os.statvfs(folder)
            free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            raise ShmSpaceError(err.errno, f"cannot reserve {nbytes} bytes ({nbytes / (1 << 30):.2f} GiB) in "
                                           f"{folder} for {purpose} ({err.strerror}); {folder} has {free} "
                                           f"bytes free ({free / (1 << 30):.2f} GiB of {size / (1 << 30):.2f} "
                                           f"GiB). {remedy[:1].upper() + remedy[1:]}, or enlarge {folder} "
                                           f"(e.g. docker --shm-size)") from err
        raise


def unlink_shm_file(path: str) -> None:
    """Remove the name of a file made by `create_shm_file` (its mappings keep the memory alive)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    forget(path)


def map_shared(path: str, nbytes: int) -> mmap.mmap:
    """Map an existing shm file MAP_SHARED read-write (writes are seen by every rank that maps it)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != nbytes:
            raise RuntimeError(f"{path} holds {os.fstat(fd).st_size} bytes; expected {nbytes}")
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def flat_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Byte offset of every tensor in a packed buffer (each aligned to 64 bytes) and the buffer's size."""
    offsets, end = {}, 0
    for name, t in tensors.items():
        end += -end % _ALIGN
        offsets[name] = end
        end += t.numel() * t.element_size()
    return offsets, end


def tensors_over(buf: mmap.mmap, like: Mapping[str, torch.Tensor],
                 offsets: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Writable tensors over `buf` with the names, dtypes and shapes of `like`, at `offsets`."""
    out = {}
    for name, t in like.items():
        if t.numel() == 0:
            out[name] = torch.empty(t.shape, dtype=t.dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offsets[name]).view(t.shape)
    return out


# ---- the cached master file ----------------------------------------------------------------------------
def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder} holds no safetensors weights (model.safetensors[.index.json])")
    return [single]


def checkpoint_key(folder: str) -> str:
    """The checkpoint's content identity, cheap to compute: sha1 over config.json (and the shard index) and,
    per weight file, its name, size, mtime_ns and safetensors header. Rewriting any weight file changes
    its mtime, so the key changes even when the shapes (hence header and size) stay the same."""
    h = hashlib.sha1()
    for name in ("config.json", "model.safetensors.index.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            h.update(f"{name}\0{len(data)}\0".encode() + data)
    for file in _weight_files(folder):
        st = os.stat(file)
        header = header_bytes(file)
        h.update(f"{os.path.relpath(file, folder)}\0{st.st_size}\0{st.st_mtime_ns}\0{len(header)}\0".encode())
        h.update(header)
    return h.hexdigest()[:16]


def _master_prefix(folder: str) -> str:
    path_hash = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    return f"{os.path.basename(os.path.normpath(folder))}-{path_hash}-"


def master_path(folder: str, dtype: torch.dtype, cache_dir: str, key: str | None = None) -> str:
    """`<cache>/master/<name>-<folder path hash>-<content key>-<dtype>.safetensors`."""
    key = key or checkpoint_key(folder)
    return os.path.join(cache_dir, "master", f"{_master_prefix(folder)}{key}-"
                        f"{str(parse_dtype(dtype)).replace('torch.', '')}.safetensors")


def prepare_master(folder: str, dtype: str | torch.dtype, cache_dir: str) -> str:
    """The master copy of the checkpoint's current content in `dtype`: reused when its file exists, else
    written atomically, after which the masters of older contents of the same folder are removed. Call on
    one rank, then on the others (`comm.on_rank0_then_all`)."""
    dtype = parse_dtype(dtype)
    for _ in range(3):          # the checkpoint may be rewritten while we convert it: then convert again
        key = checkpoint_key(folder)
        path = master_path(folder, dtype, cache_dir, key)
        if os.path.exists(path):
            return path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tensors = {}
        for file in _weight_files(folder):
            for name, t in map_safetensors(file).items():
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
        write_safetensors_atomic(path, tensors, {"content_key": key, "format": "seesaw-master"})
        if checkpoint_key(folder) != key:   # mixed old and new bytes: never serve them under either key
            os.unlink(path)
            continue
        prefix = _master_prefix(folder)
        for other in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), glob.escape(prefix) + "*")):
            name = os.path.basename(other)
            if name.endswith(".safetensors") and not name.startswith(f"{prefix}{key}-"):
                try:
                    os.unlink(other)
                except FileNotFoundError:
                    pass
        return path
    raise RuntimeError(f"{folder} kept changing while its master copy was converted; retry when it is stable")
