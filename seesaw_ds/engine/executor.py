"""Two executors behind one interface: one runs prefill batches, one runs decode batches.

The single-process engine uses `LocalExecutor` for both. The distributed engine swaps in a
pipeline-parallel prefill executor and a tensor-parallel decode executor with the same methods.
"""
from __future__ import annotations

import abc

import torch

from seesaw_ds.engine.inputs import ModelInputs
from seesaw_ds.kv.pool import KVPool
from seesaw_ds.models.runner import ModelRunner


class Executor(abc.ABC):
    @abc.abstractmethod
    def prefill(self, inputs: ModelInputs) -> torch.Tensor:
        """Run whole prompts, write their KV; return last-token logits [B, V] float32."""

    @abc.abstractmethod
    def decode(self, inputs: ModelInputs) -> torch.Tensor:
        """Run one new token per sequence against its cached KV; return logits [B, V] float32."""


class LocalExecutor(Executor):
    """Everything in this process: all layers, all KV heads, one paged pool."""

    def __init__(self, runner: ModelRunner, pool: KVPool):
        self.runner = runner
        self.pool = pool

    def _run(self, inputs: ModelInputs) -> torch.Tensor:
        return self.runner.forward(inputs.input_ids, inputs.positions, inputs.meta, self.pool,
                                   inputs.logits_indices)

    def prefill(self, inputs: ModelInputs) -> torch.Tensor:
        return self._run(inputs)

    def decode(self, inputs: ModelInputs) -> torch.Tensor:
        return self._run(inputs)
