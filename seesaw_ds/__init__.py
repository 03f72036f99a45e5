"""seesaw_ds: throughput-first offline LLM inference on DeepSpeed with pipeline-parallel prefill,
tensor-parallel decode and run-time re-sharding (Seesaw)."""
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.sequence import RequestOutput
from seesaw_ds.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"
