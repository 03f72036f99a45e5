"""Content identity of a job's model and data, for the resume fingerprint: a folder resumes only onto the same
weights and the same rows.

    model_content_key("/ckpt/llama")      # the master copy's checkpoint key (config + weight files' headers,
                                          # sizes and mtimes): a checkpoint overwritten in place changes it
    data_content_key(loaded_source)       # local file: size, mtime and a hash of its bytes; hub: the dataset's
                                          # fingerprint; registered sources: their name (options are in the recipe)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os

from seesaw_ds.jobs.sources import LoadedSource, registered_source

HASH_WHOLE_BYTES = 1 << 30      # files up to this size are hashed whole; larger ones by head, tail and stat
HASH_EDGE_BYTES = 64 << 20
_CHUNK = 1 << 20


def _file_digest(path: str) -> str:
    """size, mtime_ns and a sha256 of the bytes (head and tail of a very large file)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        if st.st_size <= HASH_WHOLE_BYTES:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                h.update(chunk)
        else:
            h.update(handle.read(HASH_EDGE_BYTES))
            handle.seek(st.st_size - HASH_EDGE_BYTES)
            h.update(handle.read(HASH_EDGE_BYTES))
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} sha256={h.hexdigest()[:16]}"


def _folder_digest(folder: str) -> str:
    """Every file under `folder` (hidden ones excepted) by relative path and _file_digest."""
    h = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            h.update(f"{os.path.relpath(path, folder)}\0{_file_digest(path)}\0".encode())
            count += 1
    return f"files={count} sha256={h.hexdigest()[:16]}"


def model_content_key(spec: str) -> str:
    """The identity of the weights `model.name` names, without loading them."""
    if spec.startswith("embedded:"):
        from seesaw_ds.models.loader import EMBEDDED_MODELS
        package = EMBEDDED_MODELS.get(spec.split(":", 1)[1], (spec, ""))[0]
        try:
            return f"{spec} {package}=={importlib.metadata.version(package.replace('_', '-'))}"
        except importlib.metadata.PackageNotFoundError:
            return f"{spec} (not installed)"
    if os.path.isfile(spec):
        return f"file {_file_digest(spec)}"
    if os.path.isdir(spec):
        from seesaw_ds.distributed.master_io import checkpoint_key
        try:
            return f"checkpoint {checkpoint_key(spec)}"
        except (FileNotFoundError, OSError, ValueError):    # no safetensors: every file's identity
            return f"folder {_folder_digest(spec)}"
    return f"hub {spec}"


def data_content_key(loaded: LoadedSource) -> str:
    """The identity of the rows `loaded` reads (see the module docstring)."""
    name = loaded.name
    if registered_source(name) is not None:
        return f"registered {name}"
    if os.path.isfile(name):
        return f"file {_file_digest(name)}"
    if os.path.isdir(name):
        return f"folder {_folder_digest(name)}"
    fingerprint = getattr(loaded.dataset, "_fingerprint", None)
    if fingerprint:
        return f"hub {name} fingerprint={fingerprint}"
    info = getattr(loaded.dataset, "info", None)
    version = getattr(info, "version", None)
    return f"hub {name} version={version} (streaming: revision not checked)"
