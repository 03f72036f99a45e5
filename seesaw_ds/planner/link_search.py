"""Where Seesaw should gain most on two hosts over a link: the planner over model shapes, workloads and link rates.

A pure query (no I/O): for each tiny Llama shape (hidden size, layers, KV heads; head_dim 64, MLP 8/3 x hidden,
the tokenizer's vocabulary), each workload and each link (a ClusterSpec per link, e.g. from `link_fit`), plan the
2-device layouts and compare PP2 -> TP2 with the best of static TP2 and PP2 (the rows `evals/slow_link.py`
measures). Shapes must fit the machine (the planner's device memory, and `max_params`) and the predicted run
of the slowest of those layouts must stay under `max_seconds`, so that the winning case can be measured.
Links not probed come from a probed shaped one by `scaled_link`: tc's token bucket scales the sustained rate,
while the line figures (latency, bandwidth under the bucket) and the bucket's depth in seconds stay.
"""
from __future__ import annotations

import dataclasses

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.planner.clusters import ClusterSpec
from seesaw_ds.planner.link_fit import TransferFit
from seesaw_ds.planner.search import PlannerOptions, plan_layouts
from seesaw_ds.planner.workload import WorkloadSpec

LABELS = {"TP2": "TP2xPP1xDP1", "PP2": "TP1xPP2xDP1", "PP2->TP2": "TP1xPP2xDP1 -> TP2xPP1xDP1"}
STATIC = ("TP2", "PP2")
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class Shape:
    """A tiny Llama: `hidden` = heads x 64, `layers` decoder layers, `kv_heads` KV heads (>= 2 for TP2)."""
    hidden: int
    layers: int
    kv_heads: int
    vocab: int = 49152

    def __post_init__(self):
        heads = self.hidden // HEAD_DIM
        if self.hidden % HEAD_DIM or self.layers < 2 or self.kv_heads < 2 or heads % self.kv_heads:
            raise ValueError(f"Shape {self}: hidden must be a multiple of {HEAD_DIM}, layers >= 2, kv_heads >= 2 "
                             f"dividing the {heads} heads")

    @property
    def intermediate(self) -> int:
        return -(-8 * self.hidden // 3 // 64) * 64

    def hf_config(self) -> dict:
        """The transformers LlamaConfig fields of this shape."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": self.hidden,
                "num_hidden_layers": self.layers, "num_attention_heads": self.hidden // HEAD_DIM,
                "num_key_value_heads": self.kv_heads, "head_dim": HEAD_DIM,
                "intermediate_size": self.intermediate, "vocab_size": self.vocab, "tie_word_embeddings": True,
                "max_position_embeddings": 4096}

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config())

    @property
    def label(self) -> str:
        return f"h{self.hidden}-L{self.layers}-kv{self.kv_heads}"


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    workload: WorkloadSpec
    link: str
    rates: dict              # layout name (TP2, PP2, PP2->TP2, best) -> predicted prompt+output tokens/s
    best_planner_static: str  # the planner's best static over every 2-device layout (DP2 included)

    @property
    def gain(self) -> float:
        """PP2 -> TP2 over the best of static TP2 and PP2."""
        return self.rates["PP2->TP2"] / max(self.rates[s] for s in STATIC)

    @property
    def seconds(self) -> float:
        """Predicted run time of the slowest of the three layouts on the workload."""
        return self.workload.total_tokens / min(self.rates[k] for k in LABELS)


def scaled_link(fit: TransferFit, factor: float) -> TransferFit:
    """A shaped link's fit at `factor` times its rate (same line figures, same bucket depth in seconds)."""
    if fit.sustained_bandwidth is None or not factor > 0:
        raise ValueError("scaled_link needs a shaped fit and a positive factor")
    sustained = fit.sustained_bandwidth * factor
    return dataclasses.replace(fit, sustained_bandwidth=sustained, line_bandwidth=max(fit.line_bandwidth, sustained))


def shape_grid(hiddens=(256, 512, 768, 1024, 1536, 2048), layers=(4, 8, 16, 24, 32), kv_options=(2, "all"),
               vocab: int = 49152) -> list[Shape]:
    """Every shape of the grid; `kv_options` entries are a KV head count or "all" (multi-head attention)."""
    shapes = []
    for hidden in hiddens:
        for num_layers in layers:
            for kv in kv_options:
                kv_heads = hidden // HEAD_DIM if kv == "all" else kv
                try:
                    shape = Shape(hidden, num_layers, kv_heads, vocab)
                except ValueError:
                    continue
                if shape not in shapes:
                    shapes.append(shape)
    return shapes


def evaluate(shape: Shape, workload: WorkloadSpec, link: str, cluster: ClusterSpec,
             options: PlannerOptions) -> Case | None:
    """The predicted rates of one case, or None when a layout of it does not fit."""
    try:
        plan = plan_layouts(shape.model_config(), cluster.with_devices(2), workload, options)
    except ValueError:
        return None
    by_label = {c.label: c.tokens_per_s for c in plan.ranked}
    if any(label not in by_label for label in LABELS.values()):
        return None
    rates = {name: by_label[label] for name, label in LABELS.items()}
    return Case(shape, workload, link, rates, plan.best_static.label)


def find_best(shapes: list[Shape], workloads: list[WorkloadSpec], links: dict[str, ClusterSpec],
              options: PlannerOptions, max_seconds: float, max_params: float) -> list[Case]:
    """Every measurable case (fits, <= `max_params` parameters, slowest layout predicted <= `max_seconds`),
    largest predicted gain of PP2 -> TP2 first."""
    cases = []
    for shape in shapes:
        if shape.model_config().num_params > max_params:
            continue
        for workload in workloads:
            for link, cluster in links.items():
                case = evaluate(shape, workload, link, cluster, options)
                if case is not None and case.seconds <= max_seconds:
                    cases.append(case)
    return sorted(cases, key=lambda c: -c.gain)


def format_cases(cases: list[Case]) -> str:
    """A text table of cases: predicted tokens/s per layout, the gain, the run time, the planner's best static."""
    lines = [f"{'model':>20} {'workload':>9} {'link':>9} {'TP2':>7} {'PP2':>7} {'PP2->TP2':>8} {'gain':>6} "
             f"{'run s':>6}  planner's best static"]
    for c in cases:
        lines.append(f"{'random:' + c.shape.label:>20} {c.workload.name:>9} {c.link:>9} {c.rates['TP2']:7.1f} "
                     f"{c.rates['PP2']:7.1f} {c.rates['PP2->TP2']:8.1f} {c.gain:6.3f} {c.seconds:6.0f}  "
                     f"{c.best_planner_static}")
    return "\n".join(lines)
