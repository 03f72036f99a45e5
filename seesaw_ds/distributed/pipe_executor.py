"""Pipeline-parallel executor on DeepSpeed's pipeline engine (forward-only, micro-batched).

The stage modules wrap transformers' own decoder layers (views of the master weights). Between stages a
flat tuple of tensors travels (DeepSpeed passes only tensors):

    (h [1,T,H], positions [T], slots [T], seq_info, block_tables [B,M], logits_indices [B], is_prefill [1])
    seq_info: prefill -> cu_seqlens [B+1]; decode -> context_lens [B]

Prefill writes each stage's layers x all KV heads to the KV target (the host store); decode reads the
stage's own paged pool. The last stage returns last-token logits; other stages return None.

Micro-batches: a pass fills and drains the pipeline, so m micro-batches over pp stages take (m + pp - 1)
micro-batch times, and every micro-batch pays each layer's fixed cost again. Decode needs this step's tokens
before the next step, so it runs as one micro-batch per step. Prefill has no such dependency, so a prefill
stage is a stream: the scheduler admits a window of up to `prefill_window_tokens(pp)` prompt tokens per step
(many more than the decode-era step budget), and the pass cuts it into micro-batches of balanced token counts
(parallel/micro_batches.py, both rules: about one per 1024 tokens, at most `PREFILL_WINDOW`; engine/inputs.py's
`balanced_groups`: prompts largest first to the lightest micro-batch, run lightest first). The fill-and-drain
bubble is thus paid once per window of many micro-batches, i.e. about once per stage on a job's
prompts; the first tokens are sampled from the logits of every micro-batch of the pass.

NOTE: the head hands its logits to the executor through `StageState.logits`, and gives DeepSpeed a fixed
[1] placeholder: the engine sums the last stage's outputs across micro-batches (as losses), which fails
when a later micro-batch holds more sequences than the first.
"""
from __future__ import annotations

import torch
from torch import nn

from seesaw_ds.engine.inputs import ModelInputs
from seesaw_ds.kv.attention import AttentionMetadata
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.models.vocab_head import ShardedLogits
from seesaw_ds.parallel.micro_batches import DECODE_MICRO_BATCHES, PREFILL_WINDOW, prefill_micro_batch_count


class StageState:
    """What the stage modules of this rank share: the model pieces and the current KV target."""

    def __init__(self, runner: ModelRunner, sliding_window: int | None):
        self.runner = runner
        self.sliding_window = sliding_window
        self.kv = None                   # set by the executor before each pass
        self.logits: list[torch.Tensor] = []   # last stage: [B_mb, V] per micro-batch of the current pass
        self.last_layer = -1             # this rank's last decoder layer: a micro-batch past it is done here
        self.stats = None                # EngineStats: prefill progress per micro-batch (mid-step), if set

    def micro_batch_done(self, num_tokens: int) -> None:
        if self.stats is not None:
            self.stats.prefill_tokens_done += num_tokens


class EmbedPipe(nn.Module):
    def __init__(self, state: StageState):
        super().__init__()
        self.state = state
        self.embed_tokens = state.runner.embed_tokens

    def forward(self, batch):
        input_ids, *rest = batch
        return (self.embed_tokens(input_ids[None, :]), *rest)


class DecoderPipe(nn.Module):
    def __init__(self, state: StageState, layer: int):
        super().__init__()
        self.state, self.layer_idx = state, layer
        self.layer = state.runner.layers[layer]

    def forward(self, batch):
        h, positions, slots, seq_info, block_tables, logits_indices, is_prefill = batch
        if bool(is_prefill[0]):
            meta = AttentionMetadata(True, slots, seq_info.tolist(), None, None)
        else:
            meta = AttentionMetadata(False, slots, [], block_tables, seq_info,
                                     sliding_window=self.state.sliding_window)
        h = self.state.runner.run_layers(h, positions, range(self.layer_idx, self.layer_idx + 1), meta,
                                         self.state.kv)
        if self.layer_idx == self.state.last_layer and meta.is_prefill:
            self.state.micro_batch_done(int(positions.numel()))
        return (h, positions, slots, seq_info, block_tables, logits_indices, is_prefill)


class HeadPipe(nn.Module):
    def __init__(self, state: StageState):
        super().__init__()
        self.state = state
        self.norm = state.runner.norm
        self.lm_head = state.runner.lm_head

    def forward(self, batch):
        h, _, _, _, _, logits_indices, _ = batch
        self.state.logits.append(self.state.runner.head(h, logits_indices))
        return torch.zeros(1)


def as_pipe_tuple(inputs: ModelInputs) -> tuple[torch.Tensor, ...]:
    m = inputs.meta
    if m.is_prefill:
        seq_info = torch.tensor(m.cu_seqlens, dtype=torch.long)
        tables = torch.zeros(1, 1, dtype=torch.long)
    else:
        seq_info, tables = m.context_lens, m.block_tables
    flag = torch.tensor([1 if m.is_prefill else 0], dtype=torch.long)
    return (inputs.input_ids, inputs.positions, m.slot_mapping, seq_info, tables, inputs.logits_indices, flag)


class PipelineExecutor:
    """Runs micro-batched passes through a DeepSpeed `PipelineEngine` built over this rank's stage."""

    def __init__(self, runner: ModelRunner, num_layers: int, kv_heads: range, pp: int,
                 sliding_window: int | None, tp: int = 1, prefill_micro_batches: int = PREFILL_WINDOW,
                 decode_micro_batches: int = DECODE_MICRO_BATCHES):
        """`runner`: this rank's model pieces (an AutoTP module's under tp > 1: each stage a TP group, whose
        ranks send and receive the whole activations, as DeepSpeed's topology pairs them)."""
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        self.runner = runner
        self.state = StageState(runner, sliding_window)
        specs = [LayerSpec(EmbedPipe, self.state)]
        specs += [LayerSpec(DecoderPipe, self.state, i) for i in range(num_layers)]
        specs += [LayerSpec(HeadPipe, self.state)]
        dp = torch.distributed.get_world_size() // (pp * tp)
        module = PipelineModule(layers=specs, topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
                                partition_method="type:DecoderPipe", dynamic_shape=True)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": dp,
                  "steps_per_print": 1 << 30,
                  "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}   # whole activations
        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        self.stage_id = self.engine.stage_id
        self.is_last = self.engine.is_last_stage()
        parts = module.parts                       # layer-spec boundaries: [embed, L decoders, head]
        lo, hi = parts[self.stage_id], parts[self.stage_id + 1]
        self.layers = range(max(lo - 1, 0), min(hi - 1, num_layers))   # this stage's decoder layers
        self.state.last_layer = self.layers[-1] if len(self.layers) else -1
        self.kv_heads = kv_heads
        self.prefill_micro_batches, self.decode_micro_batches = prefill_micro_batches, decode_micro_batches

    def report_progress(self, stats) -> None:
        """Advance `stats.prefill_tokens_done` as each prefill micro-batch leaves this rank's stage."""
        self.state.stats = stats

    def micro_batches(self, is_prefill: bool, tokens: int) -> int:
        """Micro-batches of a step of `tokens` new tokens: prefill by its size, decode a fixed count."""
        if is_prefill:
            return prefill_micro_batch_count(tokens, self.prefill_micro_batches)
        return self.decode_micro_batches

    def run(self, micro_inputs: list[ModelInputs], kv) -> torch.Tensor | None:
        """Every rank passes the same micro-batches; returns [B, V] logits on the last stage only."""
        from deepspeed.runtime.pipe import p2p
        p2p._grid = self.engine.grid     # NOTE: DeepSpeed's sends follow the grid of the last engine built
        self.state.kv, self.state.logits = kv, []
        batches = [(as_pipe_tuple(mb), torch.zeros(1)) for mb in micro_inputs]
        with torch.inference_mode(False), torch.no_grad():
            self.engine.eval_batch(iter(batches), compute_loss=False, reduce_output=None,
                                         bcast_loss=False, num_micro_batches=len(batches))
        self.engine.reset_activation_shape()
        if not self.is_last:
            return None
        logits, self.state.logits = self.state.logits, []
        if isinstance(logits[0], ShardedLogits):
            return ShardedLogits.cat(logits)
        return torch.cat([o.float() for o in logits], dim=0)
