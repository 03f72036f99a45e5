"""The CPU paged-decode attention kernel (`csrc/paged_decode.cpp`), compiled once per machine on first use.

    op = paged_decode_op()          # None when it cannot be built here (then attention uses torch ops)
    out = op(q, k_cache, v_cache, block_tables, context_lens, scale, window)   # see the .cpp header

The build goes through torch's extension builder into `TORCH_EXTENSIONS_DIR` (default
`~/.cache/torch_extensions`); the module name carries a hash of the source, the torch version and the CPU's
instruction-set flags, so a cache shared between different machines never loads a build made for another.
`SEESAW_DS_NATIVE=0` turns the kernel off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("seesaw_ds")
SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
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
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode()):
        digest.update(part)
    return f"seesaw_ds_paged_decode_{digest.hexdigest()[:12]}"


def native_enabled() -> bool:
    return os.environ.get("SEESAW_DS_NATIVE", "1") not in ("0", "false", "no", "off")


def paged_decode_op():
    """The compiled `paged_decode` function, or None (disabled, or the build failed: logged once)."""
    if not native_enabled():
        return None
    with _lock:
        if "op" not in _state:
            _state["op"] = _build()
    return _state["op"]


def _build():
    try:
        from torch.utils.cpp_extension import load
        module = load(name=extension_name(), sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
                      extra_ldflags=["-fopenmp"], verbose=False)
        return module.paged_decode
    except Exception as err:  # noqa: BLE001 - any build problem means: use the torch path
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        log.warning("seesaw_ds: the CPU paged-decode kernel could not be built (%s); decode attention "
                    "uses torch ops (slower)", lines[-1][:300])
        return None
