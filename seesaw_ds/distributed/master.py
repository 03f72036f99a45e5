"""One host master copy of the weights per node, shared by its ranks through a memory map.

The master copy is a safetensors file in the run dtype (converted once, cached beside the model cache).
Every rank maps it read-only; the OS page cache holds its bytes once per node. Shards of any layout are
views into it: a pipeline stage's whole layers, or a tensor-parallel rank's row or column slice (a column
slice of a row-major matrix is still a valid BLAS operand, leading dimension = full width). On an
accelerator a shard is copied to the device at a stage switch; on the CPU the view is used as is.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct

import torch

from seesaw_ds.models.config import parse_dtype

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(folder, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder} holds no safetensors weights (model.safetensors[.index.json])")
    return [single]


def map_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Zero-copy, read-only tensors over a safetensors file (shared page cache across processes)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end == start:
            out[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        import warnings
        with warnings.catch_warnings():      # read-only buffer: tensors are never written through
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        out[name] = flat.view(info["shape"])
    return out


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def master_path(folder: str, dtype: torch.dtype, cache_dir: str) -> str:
    key = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]
    return os.path.join(cache_dir, "master", f"{os.path.basename(os.path.normpath(folder))}-{key}-"
                        f"{str(dtype).replace('torch.', '')}.safetensors")


def prepare_master(folder: str, dtype: str | torch.dtype, cache_dir: str) -> str:
    """Write the single-file master copy in `dtype` (once; call on one rank, then barrier)."""
    dtype = parse_dtype(dtype)
    path = master_path(folder, dtype, cache_dir)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {}
    for file in _weight_files(folder):
        for name, t in map_safetensors(file).items():
            tensors[name] = t.to(dtype) if t.is_floating_point() else t
    _write_safetensors(path, tensors)
    return path


class MasterWeights:
    """Read-only mapped tensors of the whole model, keyed by Hugging Face parameter name."""

    def __init__(self, path: str):
        self.path = path
        self.tensors = map_safetensors(path)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def build_hf_model(folder: str, master: MasterWeights, dtype: torch.dtype):
    """A fresh HF model whose parameters are views of the master copy (no weight bytes allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        source = name if name in master.tensors else None
        if source is None and name == "lm_head.weight" and config.tie_word_embeddings:
            source = "model.embed_tokens.weight"
        if source is None:
            raise KeyError(f"master copy {master.path} has no tensor for parameter {name}")
        state[name] = master[source]
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
