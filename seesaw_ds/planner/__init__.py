"""Throughput model and layout planner (Seesaw, Appendix A): pure functions over frozen dataclasses.

    from seesaw_ds.planner import plan, plan_for
    plan("llama-2-70b", "8xA10", "arxiv").best_pair      # LayoutPlan with predicted tokens/s and breakdown
    plan_for(cfg, world_size=2, cluster="local", workload="sharegpt-small")  # -> StageLayouts
"""
from seesaw_ds.planner.api import plan, plan_for, stage_layouts
from seesaw_ds.planner.bundled import bundled_model_names, load_model_config
from seesaw_ds.planner.clusters import CLUSTERS, ClusterSpec, DeviceSpec, parse_cluster
from seesaw_ds.planner.roofline import TimeBreakdown, batch_limit, stage_step_time
from seesaw_ds.planner.search import LayoutPlan, Plan, PlannerOptions, StageEstimate, plan_layouts
from seesaw_ds.planner.workload import WORKLOADS, WorkloadSpec, parse_workload

__all__ = ["plan", "plan_for", "stage_layouts", "bundled_model_names", "load_model_config", "CLUSTERS",
           "ClusterSpec", "DeviceSpec", "parse_cluster", "TimeBreakdown", "batch_limit", "stage_step_time",
           "LayoutPlan", "Plan", "PlannerOptions", "StageEstimate", "plan_layouts", "WORKLOADS",
           "WorkloadSpec", "parse_workload"]
