"""The planner's side of evals/slow_link.py: cluster specs on the probed links, predicted layout ratios and the
largest predicted Seesaw gains (no engine run, no root)."""
from __future__ import annotations


def link_specs(probes: dict, links: list[str], extra_rates: list[str] = (), recalibrate: bool = False) -> dict:
    """{link: ClusterSpec}: the calibrated local 2-rank cluster (re-measured now if `recalibrate`) on each
    probed link; `extra_rates` (not probed) scale the sustained rate of the slowest probed shaped link."""
    from launch.local_cluster import rate_bits
    from seesaw_ds.planner.calibrate import local_cluster
    from seesaw_ds.planner.link_fit import cluster_on_link, fit_probe
    from seesaw_ds.planner.link_search import scaled_link
    base, specs, fits = local_cluster(2, recalibrate=recalibrate), {}, {}
    for link in links:
        if probes.get(link):
            fits[link] = fit_probe(probes[link], shaped=link != "unlimited")
            specs[link] = cluster_on_link(base, *fits[link], name=f"2 hosts @ {link}")
    shaped = sorted((rate_bits(k), k) for k in fits if k != "unlimited")
    for link in extra_rates:
        if link in specs or link == "unlimited" or not shaped:
            continue
        rate, ref = shaped[0]
        scaled = [scaled_link(f, rate_bits(link) / rate) for f in fits[ref]]
        specs[link] = cluster_on_link(base, *scaled, name=f"2 hosts @ {link} (scaled from {ref})")
    return specs


def fit_summary(spec) -> dict:
    return {"allreduce_latency": spec.allreduce_latency[0], "allreduce_line_bw": spec.allreduce_bandwidth[0],
            "allreduce_sustained_bw": spec.allreduce_sustained_bandwidth, "p2p_latency": spec.p2p_latency,
            "p2p_line_bw": spec.p2p_bandwidth, "p2p_sustained_bw": spec.p2p_sustained_bandwidth,
            "bucket_s": spec.link_bucket_seconds}


def planner_workload(name: str, reqs: list):
    from seesaw_ds.planner.workload import WorkloadSpec
    return WorkloadSpec.from_lengths(name, [len(r.prompt_token_ids) for r in reqs], [r.output_len for r in reqs])


def predicted_ratios(model_dir: str, workloads: dict, specs: dict, dtype: str) -> dict:
    """{(link, workload, layout): predicted tokens/s over the best predicted static (TP2 or PP2)}."""
    from seesaw_ds.models.loader import load_model_config
    from seesaw_ds.planner.link_search import LABELS, STATIC
    from seesaw_ds.planner.search import PlannerOptions, plan_layouts
    cfg, out = load_model_config(model_dir), {}
    for link, spec in specs.items():
        for name, reqs in workloads.items():
            result = plan_layouts(cfg, spec, planner_workload(name, reqs), PlannerOptions(dtype=dtype))
            rates = {c.label: c.tokens_per_s for c in result.ranked}
            best = max(rates.get(LABELS[s], 0.0) for s in STATIC)
            for layout, label in LABELS.items():
                if label in rates and best:
                    out[(link, name, layout)] = rates[label] / best
    return out


def find_best_report(workloads: dict, specs: dict, dtype: str, top: int, max_seconds: float, scale: float) -> str:
    """The planner's largest predicted PP2 -> TP2 gains over shapes x workloads x links."""
    from seesaw_ds.planner.link_search import find_best, format_cases, shape_grid
    from seesaw_ds.planner.search import PlannerOptions
    loads = [planner_workload(name, reqs) for name, reqs in workloads.items()]
    cases = find_best(shape_grid(), loads, specs, PlannerOptions(dtype=dtype), max_seconds, max_params=400e6)
    lines = [format_cases(cases[:top])]
    if cases:
        c = cases[0]
        links = "unlimited" if c.link == "unlimited" else f"unlimited,{c.link}"
        lines.append(f"measure it: sudo python evals/slow_link.py --model random:{c.shape.label} --workloads "
                     f"{c.workload.name} --scale {scale:g} --links {links} --dtype {dtype}")
    return "\n".join(lines)
