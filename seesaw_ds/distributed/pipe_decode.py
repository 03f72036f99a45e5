"""This rank's stage of a decode pipeline that stays full across steps (the engine's side: engine/in_flight.py).

DeepSpeed's pipeline pass fills and drains on every call, and a decode step needs its tokens before the next
one, so a pass per step leaves each stage idle (pp - 1) / pp of the time. Here the running sequences take
turns in pp micro-batches: micro-batch i runs on stage s at tick i + s, and its tokens, sampled on the last
stage, reach every stage before micro-batch i + pp (the same sequences, one token on) enters stage 0.

Every rank runs the same scheduler, so each builds micro-batch i's inputs itself; only two things travel,
as point-to-point sends over the default process group (gloo on CPUs, NCCL on GPUs):

    hidden states  stage s -> s + 1     [1, B, H] in the model's dtype (B: the micro-batch's sequences)
    tokens         last stage -> others [B] long, then (rows that ask for logprobs) a pickled list
"""
from __future__ import annotations

import pickle
from collections import deque

import torch

from seesaw_ds.engine.inputs import ModelInputs

HIDDEN, TOKENS, LOGPROBS_LEN, LOGPROBS = 11, 12, 13, 14     # message tags


class StagePipe:
    """Runs one micro-batch through this rank's stage; sends and receives what crosses stages."""

    def __init__(self, executor):
        """`executor`: a PipelineExecutor whose stages are single ranks (tp == 1)."""
        grid = executor.engine.grid
        self.pp = grid.get_pipe_parallel_world_size()
        self.stage = executor.stage_id
        self.ranks = [grid.stage_to_global(s) for s in range(self.pp)]   # this replica's stage -> global rank
        self.runner, self.layers = executor.runner, executor.layers
        embed = executor.runner.embed_tokens
        self.hidden, self.dtype = embed.weight.shape[1], embed.weight.dtype
        self._sends: deque = deque()          # (work, tensor): a tensor lives until its send completes

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs, kv) -> torch.Tensor | None:
        """The micro-batch through this stage's layers: its [B, V] fp32 logits on the last stage, else None
        (the hidden states go on to the next stage)."""
        import torch.distributed as dist
        if self.stage == 0:
            h = self.runner.embed(inputs.input_ids)                                  # [1, B, H]
        else:
            h = torch.empty(1, inputs.input_ids.numel(), self.hidden, dtype=self.dtype)
            dist.recv(h, src=self.ranks[self.stage - 1], tag=HIDDEN)
        h = self.runner.run_layers(h, inputs.positions, self.layers, inputs.meta, kv)
        if self.is_last:
            return self.runner.head(h, inputs.logits_indices).float()
        self._send(h.contiguous(), self.ranks[self.stage + 1], HIDDEN)
        return None

    def send_tokens(self, tokens: list[int], logprobs: list | None) -> None:
        """Last stage: a micro-batch's sampled tokens (and logprobs, if any row asked) to every other stage."""
        ids = torch.tensor(tokens, dtype=torch.long)
        payload = None
        if logprobs is not None:
            payload = torch.frombuffer(bytearray(pickle.dumps(logprobs)), dtype=torch.uint8)
        for rank in self.ranks[:-1]:
            self._send(ids, rank, TOKENS)
            if payload is not None:
                self._send(torch.tensor([payload.numel()], dtype=torch.long), rank, LOGPROBS_LEN)
                self._send(payload, rank, LOGPROBS)

    def recv_tokens(self, num_seqs: int, with_logprobs: bool) -> tuple[list[int], list | None]:
        """Other stages: the next micro-batch's tokens from the last stage, in the order they were sampled."""
        import torch.distributed as dist
        src = self.ranks[-1]
        ids = torch.empty(num_seqs, dtype=torch.long)
        dist.recv(ids, src=src, tag=TOKENS)
        logprobs = None
        if with_logprobs:
            size = torch.empty(1, dtype=torch.long)
            dist.recv(size, src=src, tag=LOGPROBS_LEN)
            payload = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(payload, src=src, tag=LOGPROBS)
            logprobs = pickle.loads(payload.numpy().tobytes())
        self._reap()
        return ids.tolist(), logprobs

    @property
    def sends_pending(self) -> int:
        """Sends of this rank not yet seen complete."""
        self._reap()
        return len(self._sends)

    def flush(self) -> None:
        """Wait until every send of this rank has completed (before another pipeline takes the links)."""
        while self._sends:
            self._sends.popleft()[0].wait()

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        import torch.distributed as dist
        self._sends.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        self._reap()

    def _reap(self) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()
