"""Entry points: `plan` (everything, for the CLI) and `plan_for` (the chosen layouts, for recipes)."""
from __future__ import annotations

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout, StageLayouts
from seesaw_ds.planner.bundled import load_model_config
from seesaw_ds.planner.clusters import ClusterSpec, parse_cluster
from seesaw_ds.planner.search import LayoutPlan, Plan, PlannerOptions, plan_layouts
from seesaw_ds.planner.workload import WorkloadSpec, parse_workload


def plan(model: ModelConfig | str, cluster: ClusterSpec | str, workload: WorkloadSpec | str,
         options: PlannerOptions | None = None, *, num_devices: int | None = None,
         recalibrate: bool = False) -> Plan:
    """Rank all layouts. `model`: a ModelConfig, bundled name, config.json or folder; `cluster`: a
    ClusterSpec or a spec such as "8xA10" / "local"; `workload`: a WorkloadSpec, preset name or "P/O/N"."""
    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    spec = parse_cluster(cluster, num_devices, recalibrate=recalibrate)
    return plan_layouts(cfg, spec, parse_workload(workload), options)


def stage_layouts(candidate: LayoutPlan) -> StageLayouts:
    return StageLayouts(prefill=Layout(*candidate.prefill.degrees), decode=Layout(*candidate.decode.degrees))


def plan_for(cfg: ModelConfig, world_size: int, cluster: ClusterSpec | str = "local",
             workload: WorkloadSpec | str = "sharegpt-small", options: PlannerOptions | None = None,
             ) -> StageLayouts:
    """The fastest predicted layouts (a re-sharded pair, or a static layout when that wins) on
    `world_size` devices of `cluster`'s kind."""
    return stage_layouts(plan(cfg, cluster, workload, options, num_devices=world_size).best)
