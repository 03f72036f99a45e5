"""The per-layer roofline of one stage step under one parallel layout (Seesaw, Appendix A).

Symbols: b sequences in the step, s tokens of context, h_q / h_kv heads, d head dim, L layers, W parameters
per layer, B_mem device memory bandwidth, FLOPS device peak for the dtype, `e` bytes per element.

    term             prefill (b prompts of s tokens)     decode (b sequences, one token each)
    move weights     e W / B_mem                        e W / B_mem
    linear compute   2 b s W / FLOPS                    2 b W / FLOPS
    move Q/K/V, KV   e b s (h_q + 2 h_kv) d / B_mem     2 e b s h_kv d / B_mem
    attention        b h_q s^2 d / FLOPS                2 b h_q s d / FLOPS
    TP all-reduce    2 e b s H / B_ar(TP)               2 e b H / B_ar(TP)

(H = hidden size = h_q d for Llama; with e = 2 these are the paper's fp16 figures.)

Layout (tp, pp, dp) on N = tp*pp*dp devices, tp <= num_kv_heads (every TP rank owns at least one whole KV
head: KV heads are never replicated, so the PP->TP KV re-shard is a pure slice; uneven head splits are
allowed, as DeepSpeed AutoTP makes them), pp <= num_layers. Assumptions:
- A replica (tp*pp devices) gets b/dp sequences and splits them into m micro-batches (default m = pp).
  Every stage re-reads its weights once per micro-batch.
- One step is one pass of the DeepSpeed pipeline engine (`eval_batch`): it fills and drains, because the
  next step needs this step's sampled tokens. With u the busiest stage's time for one micro-batch, the step
  takes m u of work plus a `bubble` of (pp - 1) micro-batch times of the other stages, which hold layers
  but no LM head (the last stage's head is on the critical path once per micro-batch, not in the fill and
  drain): (pp - 1) (u - u_head). (`drains=False`: the paper's steady state, micro-batches of consecutive
  steps in flight. Decode's next token of a micro-batch still waits for its trip through every stage, so a
  step lasts at least (pp - 1) (u - u_head) + u: with fewer micro-batches than stages the rest is a bubble.)
- Terms add (no overlap of memory traffic, compute and communication), as in the paper.
- Where the device lists measured few-row linear rates (`DeviceSpec.decode_flops`, calibrated for `local`),
  a decode step's linears take at least their FLOPs at that rate for the micro-batch's rows (the `linear`
  term is what that time adds to the weight read); so does its LM head.
- The slowest device sets the pace: ceil(L/pp) layers on a stage, ceil(h_kv/tp) KV heads (and their query
  groups) on a TP rank; the MLP splits evenly. With even splits and m = pp the work part is exactly
      t ~ L * (T_w/TP + (T_lin + T_kv + T_attn)/(DP*TP*PP) + T_ar(TP)/(PP*DP)).
- All-reduce: 2 per layer per micro-batch (after attention and after the MLP), latency paid per call.
  Pipeline sends: `PIPE_MESSAGES` messages per micro-batch per stage boundary (the stage tuple and its
  shapes).
- `overhead`: the device's fixed cost of calling one decoder layer (`DeviceSpec.layer_overhead`: kernel
  launches or, on a CPU, operator dispatch), paid per layer per micro-batch whatever the batch; TP does not
  divide it.
- `lm_head`: the logits of each sequence's last token (every token in decode): 2 b V H FLOPs and the V x H
  weight read per micro-batch, on the last pipeline stage (counted on the busiest one), split by TP over
  vocabulary rows: greedy decoding exchanges each row's (max, id) per rank, not the b x V logits.
- A shaped link (`ClusterSpec.shaped`: a token bucket) refills during compute: each all-reduce of a layer
  follows 1/(2m) of the layer's compute, each pipeline send one micro-batch's compute, the head's exchange
  the LM head's compute.
- Devices that share a memory bus (CPU ranks of a node) run faster alone than together by
  `DeviceSpec.solo_speedup`; the rates above are those of all devices running at once. In a pipeline
  without bubbles (`drains=False`) every stage runs its layers at once, and the last stage's LM head, work
  the other stages do not have, runs while they wait for it: at the solo rate.
- Rates are datasheet peaks (or measured, for `local`): absolute tokens/s are rough; the model is meant
  for ranking layouts against each other.
"""
from __future__ import annotations

import dataclasses
import math

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.planner.clusters import ClusterSpec, dtype_bytes

PREFILL, DECODE = "prefill", "decode"
STAGES = (PREFILL, DECODE)

Degrees = tuple[int, int, int]  # (tp, pp, dp)
PIPE_MESSAGES = 8               # DeepSpeed sends per micro-batch and boundary: 7 tensors + their shapes
IN_FLIGHT_MESSAGES = 2          # decode in flight (engine/in_flight.py): the hidden states on, the tokens back


@dataclasses.dataclass(frozen=True)
class TimeBreakdown:
    """Seconds spent in each term (for one step, or summed over a workload)."""
    weights: float = 0.0
    linear: float = 0.0
    kv: float = 0.0
    attention: float = 0.0
    allreduce: float = 0.0
    p2p: float = 0.0
    overhead: float = 0.0         # fixed per decoder-layer call
    lm_head: float = 0.0
    bubble: float = 0.0           # pipeline fill and drain of each step
    switch_weights: float = 0.0   # re-loading weight shards from the host copy at stage switches
    switch_kv: float = 0.0        # KV traffic through the host tier not hidden behind compute

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"TimeBreakdown.{field.name} must be finite and >= 0, got {value}")

    @property
    def total(self) -> float:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def scaled(self, factor: float) -> "TimeBreakdown":
        return TimeBreakdown(**{k: v * factor for k, v in self.as_dict().items()})

    def __add__(self, other: "TimeBreakdown") -> "TimeBreakdown":
        return TimeBreakdown(**{k: v + getattr(other, k) for k, v in self.as_dict().items()})


def check_degrees(cfg: ModelConfig, degrees: Degrees) -> None:
    tp, pp, dp = degrees
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"layout {name} must be a positive int, got {value!r}")
    if tp > cfg.num_kv_heads:
        raise ValueError(f"layout tp={tp} exceeds num_kv_heads={cfg.num_kv_heads}: "
                         f"every TP rank must own at least one whole KV head")
    if pp > cfg.num_layers:
        raise ValueError(f"layout pp={pp} exceeds num_layers={cfg.num_layers}")


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads on the busiest TP rank (query heads follow their KV group)."""
    return math.ceil(cfg.num_kv_heads / tp)


def layer_params_per_rank(cfg: ModelConfig, tp: int) -> float:
    """Parameters of one decoder layer held by the busiest TP rank. The two norm vectors (replicated in
    practice, negligible) count as split, so that an even split is exactly W / TP."""
    h, d = cfg.hidden_size, cfg.head_dim
    head_share = kv_heads_per_rank(cfg, tp) / cfg.num_kv_heads
    attn = h * d * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * d * h
    if cfg.qkv_bias:
        attn += d * (cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * h * cfg.intermediate_size
    return attn * head_share + (mlp + 2 * h) / tp


def layers_per_stage(cfg: ModelConfig, pp: int) -> int:
    return math.ceil(cfg.num_layers / pp)


def weight_bytes_per_device(cfg: ModelConfig, degrees: Degrees, dtype="bfloat16") -> float:
    """Weights on the fullest device: its layers' TP shard plus a vocab-parallel embedding or LM head
    (both when pp == 1 and the two are not tied)."""
    tp, pp, _ = degrees
    vocab = cfg.embedding_params if pp == 1 else cfg.vocab_size * cfg.hidden_size
    params = layers_per_stage(cfg, pp) * layer_params_per_rank(cfg, tp) + vocab / tp
    return params * dtype_bytes(dtype)


def kv_bytes_per_sequence_per_device(cfg: ModelConfig, degrees: Degrees, seq_len: float, dtype="bfloat16"):
    """K and V of one sequence of `seq_len` tokens on one device (its layers, its KV heads)."""
    tp, pp, _ = degrees
    return (2 * layers_per_stage(cfg, pp) * kv_heads_per_rank(cfg, tp) * cfg.head_dim * seq_len
            * dtype_bytes(dtype))


def batch_limit(cfg: ModelConfig, cluster: ClusterSpec, degrees: Degrees, seq_len: float,
                dtype="bfloat16", memory_utilization: float = 0.9) -> int:
    """b_max = DP * M_kv / (KV bytes of one sequence per device), M_kv = usable memory - weights.

    Evenly split this is the paper's DP * M_kv * TP * PP / (4 L h_kv d s). Returns 0 when the weights
    alone do not fit or not even one sequence's KV does. `memory_utilization` leaves room for activations
    and the runtime.
    """
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    kv_space = cluster.device.memory_bytes * memory_utilization - weight_bytes_per_device(cfg, degrees, dtype)
    if kv_space <= 0:
        return 0
    per_replica = int(kv_space // kv_bytes_per_sequence_per_device(cfg, degrees, seq_len, dtype))
    return degrees[2] * per_replica


def stage_step_time(cfg: ModelConfig, cluster: ClusterSpec, degrees: Degrees, stage: str, batch: float,
                    seq_len: float, dtype="bfloat16", micro_batches: int | None = None,
                    drains: bool = True, pipe_messages: int = PIPE_MESSAGES) -> TimeBreakdown:
    """Seconds for one step on the busiest device: prefill of `batch` prompts of `seq_len` tokens, or one
    decode token for each of `batch` sequences holding `seq_len` tokens of context. `micro_batches`: m of
    the pipeline pass (None: pp), at most the sequences per replica. `drains=False` is the paper's steady
    state (micro-batches of consecutive steps keep every stage busy: no bubble)."""
    check_degrees(cfg, degrees)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch and seq_len must be positive, got batch={batch}, seq_len={seq_len}")
    if micro_batches is not None and micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1 or None, got {micro_batches}")
    tp, pp, dp = degrees
    e = dtype_bytes(dtype)
    flops = cluster.device.flops_for(dtype)
    mem_bw = cluster.device.memory_bandwidth
    layers = layers_per_stage(cfg, pp)
    seqs = batch / dp                                    # sequences per replica
    m = max(1.0, min(float(micro_batches or pp), seqs))
    new_tokens = seqs * (seq_len if stage == PREFILL else 1)  # tokens through the linears per replica
    kv_heads = kv_heads_per_rank(cfg, tp)
    q_heads = kv_heads * cfg.q_per_kv
    d, hidden, vocab = cfg.head_dim, cfg.hidden_size, cfg.vocab_size
    w_rank = layer_params_per_rank(cfg, tp)

    weights = layers * m * e * w_rank / mem_bw
    linear = layers * 2 * new_tokens * w_rank / flops
    decode_rate = cluster.device.decode_flops_for(dtype, new_tokens / m) if stage == DECODE else None
    if decode_rate is not None:             # measured few-row linears: their time beyond the weight read
        linear = max(linear, layers * 2 * new_tokens * w_rank / decode_rate - weights)
    if stage == PREFILL:
        kv = layers * e * seqs * seq_len * (q_heads + 2 * kv_heads) * d / mem_bw
        attention = layers * seqs * q_heads * seq_len ** 2 * d / flops
    else:
        kv = layers * 2 * e * seqs * seq_len * kv_heads * d / mem_bw
        attention = layers * 2 * seqs * q_heads * seq_len * d / flops
    overhead = layers * m * cluster.device.layer_overhead
    compute = weights + linear + kv + attention + overhead     # between the step's transfers
    head_flops = 2 * seqs * vocab * hidden / tp
    head_compute = head_flops / flops + m * e * vocab * hidden / (tp * mem_bw)
    if decode_rate is not None:             # a few-row linear too, over V x H / tp weights
        head_compute = max(head_compute, head_flops / decode_rate)
    if pp > 1 and not drains:       # stages at once: the last one's head runs while the others wait for it
        head_compute /= cluster.device.solo_speedup
    allreduce = layers * cluster.allreduce_seconds(2 * e * new_tokens * hidden, tp, calls=2 * m,
                                                   gap=compute / (layers * 2 * m))
    p2p = (cluster.p2p_seconds(e * new_tokens * hidden, messages=pipe_messages * m, transfers=m,
                               gap=compute / m) if pp > 1 else 0.0)
    # vocabulary-parallel head: greedy rows exchange (max, id) per rank, fp32 (models/vocab_head.py)
    lm_head = head_compute + cluster.allreduce_seconds(4 * 2 * tp * seqs, tp, calls=m, gap=head_compute / m)
    work = TimeBreakdown(weights=weights, linear=linear, kv=kv, attention=attention, allreduce=allreduce,
                         p2p=p2p, overhead=overhead, lm_head=lm_head)
    others = (pp - 1) * (work.total - work.lm_head) / m     # one micro-batch through the stages without the head
    if drains:
        bubble = others
    elif stage == DECODE:   # a micro-batch's next token waits for its trip through every stage
        bubble = max(0.0, others - (m - 1) * work.total / m)
    else:
        bubble = 0.0
    return dataclasses.replace(work, bubble=bubble)


def enumerate_degrees(cfg: ModelConfig, num_devices: int, max_tp: int | None = None) -> list[Degrees]:
    """Every (tp, pp, dp) with tp*pp*dp == num_devices, tp <= min(max_tp, num_kv_heads), pp <= num_layers."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    tp_cap = min(max_tp or cfg.num_kv_heads, cfg.num_kv_heads)
    out = []
    for tp in range(1, min(tp_cap, num_devices) + 1):
        if num_devices % tp:
            continue
        for pp in range(1, num_devices // tp + 1):
            if (num_devices // tp) % pp == 0 and pp <= cfg.num_layers:
                out.append((tp, pp, num_devices // (tp * pp)))
    return out
