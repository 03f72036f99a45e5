"""Plain-text views of a Plan: the ranked table and, per layout, where the time goes."""
from __future__ import annotations

from seesaw_ds.planner.roofline import TimeBreakdown
from seesaw_ds.planner.search import LayoutPlan, Plan, StageEstimate


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB"


def describe_inputs(plan: Plan) -> str:
    cfg, cluster, wl = plan.model, plan.cluster, plan.workload
    dev = cluster.device
    return "\n".join([
        f"model     {cfg.model_type}, {cfg.num_params / 1e9:.2f}B params, L={cfg.num_layers}, "
        f"H={cfg.hidden_size}, heads {cfg.num_heads}q/{cfg.num_kv_heads}kv x {cfg.head_dim}, {plan.options.dtype}",
        f"cluster   {cluster.num_devices}x{cluster.name} ({cluster.source}): {_gib(dev.memory_bytes)}, "
        f"{dev.memory_bandwidth / 1e9:.0f} GB/s, {dev.flops_for(plan.options.dtype) / 1e12:.3g} TFLOP/s, "
        f"p2p {cluster.p2p_bandwidth / 1e9:.3g} GB/s, host link {cluster.host_link_bandwidth / 1e9:.3g} GB/s, "
        f"host {_gib(cluster.host_memory_per_device)}/device",
        f"workload  {wl.name}: {wl.num_requests} requests, prompt {wl.mean_prompt_len:g}, "
        f"output {wl.mean_output_len:g} tokens (mean)",
    ])


def format_table(plan: Plan, limit: int | None = None) -> str:
    rows = [("rank", "prefill -> decode layout", "tokens/s", "out tok/s", "vs static", "batch P/D", "switches")]
    for i, cand in enumerate(plan.ranked[:limit] if limit else plan.ranked, start=1):
        tag = " (static)" if cand.is_static else ""
        rows.append((str(i), cand.label + tag, f"{cand.tokens_per_s:,.0f}", f"{cand.output_tokens_per_s:,.0f}",
                     f"{plan.speedup(cand):.2f}x", f"{cand.prefill.batch}/{cand.decode.batch}",
                     str(cand.num_switches)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    summary = [f"best static: {plan.best_static.label}  {plan.best_static.tokens_per_s:,.0f} tokens/s"]
    if plan.best_pair:
        summary.append(f"best re-sharded pair: {plan.best_pair.label}  {plan.best_pair.tokens_per_s:,.0f} "
                       f"tokens/s ({plan.speedup(plan.best_pair):.2f}x)")
    return "\n".join(lines + [""] + summary)


def _breakdown_line(label: str, time: TimeBreakdown) -> str:
    total = time.total
    parts = [f"{k} {v:.3g}s ({100 * v / total:.0f}%)" for k, v in time.as_dict().items() if v > 0]
    return f"  {label:<8} {total:.4g}s = " + ", ".join(parts)


def _stage_line(est: StageEstimate) -> str:
    unit = "prompts" if est.stage == "prefill" else "sequences"
    return (f"  {est.stage:<8} {est.batch} {unit} per step (memory limit {est.batch_limit}), "
            f"s={est.seq_len:g}: {est.step.total * 1e3:.3g} ms/step, {est.tokens_per_s:,.0f} tokens/s; "
            f"bound by {max(est.step.as_dict().items(), key=lambda kv: kv[1])[0]}")


def explain(plan: Plan, cand: LayoutPlan) -> str:
    lines = [f"{cand.label}: {cand.tokens_per_s:,.0f} tokens/s, {plan.speedup(cand):.2f}x the best static",
             _stage_line(cand.prefill), _stage_line(cand.decode),
             _breakdown_line("total", cand.time)]
    if not cand.is_static:
        lines.append(f"  switches {cand.num_switches} (host tier holds the prompt KV in "
                     f"{(cand.num_switches + 1) // 2} prefill->decode cycle(s))")
    return "\n".join(lines)


def format_explain(plan: Plan, limit: int | None = None) -> str:
    ranked = plan.ranked[:limit] if limit else plan.ranked
    return "\n\n".join(explain(plan, cand) for cand in ranked)
