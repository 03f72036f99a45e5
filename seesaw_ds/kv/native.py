"""The CPU kernels (`csrc/`: attention, fused layer ops, decode's linear), built once per machine.

    op = paged_decode_op()          # None when it cannot be built here (then attention uses torch ops)
    out = op(q, k_cache, v_cache, block_tables, context_lens, scale, window)   # csrc/paged_decode.cpp
    op = prefill_attention_op()     # None without AVX512-BF16 (then prefill uses torch's SDPA)
    out = op(q, k, v, cu_seqlens, scale)                                      # csrc/prefill_attention.cpp
    set_prefill_amx(False)          # keep prefill on AVX512-BF16 even where the tile unit (AMX) is usable
    pack, linear = linear_ops()     # bf16 linears at decode's row counts (csrc/decode_linear.cpp), or None
    values, ids = row_max(logits)   # each row's first maximum (csrc/row_max.cpp; torch's max where not built)

The build goes through torch's extension builder into `TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`); the module name carries a hash of the source, the torch version, the CPU's
instruction-set flags and the source folder, so a cache shared between machines never loads a build made
for another, and two checkouts on one machine never rebuild each other's. `SEESAW_DS_NATIVE=0` turns the
kernels off (`SEESAW_DS_NATIVE_LINEAR=0` only the linear one); `SEESAW_DS_PREFILL_AMX=0` starts the prefill
kernel on its AVX512-BF16 path instead of the tile unit (see `set_prefill_amx`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("seesaw_ds")
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("bindings.cpp", "paged_decode.cpp", "prefill_attention.cpp", "layer_ops.cpp", "decode_linear.cpp",
           "row_max.cpp")
HEADERS = ("kernels.h", "vec.h", "decode_bf16.h", "decode_amx.h", "prefill_amx.h", "prefill_pack.h")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def extension_name() -> str:
    digest = hashlib.sha1()
    parts = [(CSRC / name).read_bytes() for name in SOURCES + HEADERS]
    # the folder too: ninja re-runs a build whose source paths changed, so two checkouts sharing one cache
    # would otherwise rebuild each other's extension inside a job
    for part in parts + [torch.__version__.encode(), _cpu_flags().encode(), str(CSRC.resolve()).encode()]:
        digest.update(part)
    return f"seesaw_ds_attention_{digest.hexdigest()[:12]}"


def env_switch(name: str) -> bool:
    """An on-by-default switch from the environment: off for 0, false, no or off."""
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


def native_enabled() -> bool:
    return env_switch("SEESAW_DS_NATIVE")


def _module():
    if not native_enabled():
        return None
    with _lock:
        if "module" not in _state:
            module = _build()
            if module is not None:
                module.set_prefill_amx(env_switch("SEESAW_DS_PREFILL_AMX"))
            _state["module"] = module
    return _state["module"]


def paged_decode_op():
    """The compiled `paged_decode` function, or None (disabled, or the build failed: logged once)."""
    module = _module()
    return module.paged_decode if module is not None else None


def prefill_attention_op():
    """The compiled bf16 `prefill_attention` function, or None (disabled, no build, or no AVX512-BF16).

    It runs on the tile unit (AMX, csrc/prefill_amx.h) where the CPU has one and Linux grants the process its
    state, else on AVX512-BF16 (`set_prefill_amx` chooses; the two agree to bf16 rounding)."""
    module = _module()
    return module.prefill_attention if module is not None and module.has_prefill_attention() else None


def set_prefill_amx(enabled: bool) -> bool:
    """Let `prefill_attention` use the tile unit (AMX) where usable (the default, unless `SEESAW_DS_PREFILL_AMX=0`)
    or keep it on AVX512-BF16, for every later call in this process; returns whether the AMX path is now in use."""
    module = _module()
    return bool(module is not None and module.set_prefill_amx(bool(enabled)))


def layer_ops():
    """The compiled bf16 (`rms_norm`, `silu_mul`, `rope_kv_write`, `rope`), or None (disabled, no build, or
    no AVX512-BF16)."""
    module = _module()
    if module is None or not module.has_prefill_attention():     # compiled in under the same ISA test
        return None
    return module.rms_norm, module.silu_mul, module.rope_kv_write, module.rope


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, V] -> (values [B], indices [B] int64): each row's first maximum, as `x.max(dim=-1)`; the native
    op for fp32 CPU logits (a greedy pick's cost at decode's batch x vocabulary), torch's otherwise."""
    module = _module() if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1] else None
    if module is None:
        best = x.max(dim=-1)
        return best.values, best.indices
    return module.row_max(x)


def linear_ops():
    """The compiled bf16 (`pack_linear(w)`, `linear_packed(x, packed, bias, N)`), or None (disabled, no build,
    or neither a tile unit (AMX) nor AVX512-BF16 here)."""
    module = _module()
    if module is None or not env_switch("SEESAW_DS_NATIVE_LINEAR") or not module.has_linear_packed():
        return None
    return module.pack_linear, module.linear_packed


def _clear_stale_lock(name: str, max_age_s: float = 900.0) -> None:
    """A build killed mid-way (kill -9) leaves torch's build lock behind, and every later load would wait
    on it forever: remove a lock older than any real build."""
    from torch.utils.cpp_extension import _get_build_directory
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            log.warning("seesaw_ds: removed a stale build lock %s", lock)
    except FileNotFoundError:
        pass


def _build():
    try:
        from torch.utils.cpp_extension import load
        _clear_stale_lock(extension_name())
        module = load(name=extension_name(), sources=[str(CSRC / name) for name in SOURCES],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
                      extra_ldflags=["-fopenmp"], verbose=False)
        return module
    except Exception as err:  # noqa: BLE001 - any build problem means: use the torch path
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        log.warning("seesaw_ds: the CPU attention kernels could not be built (%s); attention "
                    "uses torch ops (slower)", lines[-1][:300])
        return None
