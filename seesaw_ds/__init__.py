"""seesaw_ds: throughput-first offline LLM inference on DeepSpeed with pipeline-parallel prefill,
tensor-parallel decode and run-time re-sharding (Seesaw).

The public names load lazily, so `import seesaw_ds.jobs` or `launch/plan.py --help` stay fast."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput"]

_EXPORTS = {"LLM": "seesaw_ds.llm", "EngineConfig": "seesaw_ds.engine.config", "SamplingParams": "seesaw_ds.engine.sampling_params",
            "RequestOutput": "seesaw_ds.engine.sequence"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'seesaw_ds' has no attribute {name!r}")
