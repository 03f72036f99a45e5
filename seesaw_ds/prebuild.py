"""Build the compiled CPU ops once, at install time, so that no job compiles inside its timed run.

    python -m seesaw_ds.prebuild           # `make install` runs it after pip install; idempotent
    ensure_built(announce=print)           # a job calls it before its engine: builds what is missing,
                                           # announced on one line, so the job's clock never holds a compile

Two ops are JIT-built by torch's extension builder into `TORCH_EXTENSIONS_DIR`:
  * the project's attention / layer kernels (`seesaw_ds/kv/native.py`, built by its own loader);
  * DeepSpeed's shared-memory all-reduce (`ShareMemCommBuilder`), which the first
    `deepspeed.init_distributed()` on the CPU accelerator would otherwise compile.
An op that cannot be built here is reported and skipped (both have a slower fallback at run time).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

# Seconds a build takes on a 2-core machine (for the announcement only).
EXPECTED_BUILD_S = {"seesaw_ds attention kernels": 60, "DeepSpeed shm all-reduce": 60}


def _built(name: str) -> bool:
    """True when torch's extension cache holds a finished build of extension `name` (no compile needed)."""
    from torch.utils.cpp_extension import _get_build_directory
    folder = Path(_get_build_directory(name, verbose=False))
    return any(folder.glob(f"{name}*.so"))


def _native_name() -> str | None:
    from seesaw_ds.kv import native
    return native.extension_name() if native.native_enabled() else None


def _shm_builder():
    """DeepSpeed's shared-memory all-reduce builder, as `init_distributed` creates it; None when the
    accelerator has none or DeepSpeed marks it incompatible here."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def _build_native() -> bool:
    from seesaw_ds.kv import native
    return native.paged_decode_op() is not None


def _build_shm() -> bool:
    builder = _shm_builder()
    return builder is not None and builder.load(verbose=False) is not None


def missing() -> list[str]:
    """The ops this machine still has to compile (a cheap check: no build, no import of the op)."""
    out = []
    name = _native_name()
    if name is not None and not _built(name):
        out.append("seesaw_ds attention kernels")
    builder = _shm_builder()
    if builder is not None and not _built(builder.name):
        out.append("DeepSpeed shm all-reduce")
    return out


def build(ops: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, float]:
    """Build `ops` (default: every op still missing); returns {op: seconds}. Loading a built op is cheap."""
    builders = {"seesaw_ds attention kernels": _build_native, "DeepSpeed shm all-reduce": _build_shm}
    seconds = {}
    for op in (missing() if ops is None else ops):
        t0 = time.perf_counter()
        ok = builders[op]()
        seconds[op] = time.perf_counter() - t0
        log(f"{op}: {'built' if ok else 'not available here (a slower fallback is used)'} "
            f"in {seconds[op]:.1f} s")
    return seconds


def ensure_built(announce: Callable[[str], None] = print) -> float:
    """Before a job: build what is missing, announced on one line first. Returns the seconds spent."""
    todo = missing()
    if not todo:
        return 0.0
    eta = sum(EXPECTED_BUILD_S[op] for op in todo)
    announce(f"building CPU kernels (once, ~{eta} s): {', '.join(todo)}...")
    return sum(build(todo, log=lambda _: None).values())


def main() -> int:
    todo = missing()
    if not todo:
        print("prebuild: every CPU op is already built")
        return 0
    build(todo)
    left = missing()
    if left:
        print(f"prebuild: still not built: {', '.join(left)} (jobs will use the fallbacks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
