"""Pure job planning: replica roles tile the world, recipe layouts resolve or fail by name, reports add up."""
import pytest

from seesaw_ds.jobs.parallel_spec import data_parallel_size, describe_layouts, validate_parallel
from seesaw_ds.jobs.report import combine, format_report
from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.jobs.world import (FOLD_MARGIN, PAIR_MARGIN, JobWorld, choose_layouts, recipe_layouts, replica_role,
                                  row_label, seesaw_or_static)
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout, StageLayouts, auto_layouts


def cfg():
    from transformers import LlamaConfig
    return ModelConfig.from_hf(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("layouts", [StageLayouts(Layout(pp=2), Layout(tp=2)), StageLayouts.static(Layout(dp=4)),
                                     StageLayouts.static(Layout(tp=2, dp=1)), StageLayouts.static(Layout())])
def test_replica_roles_tile_the_world(layouts):
    roles = [replica_role(layouts, rank) for rank in range(layouts.world_size)]
    writers = [r.rank for r in roles if r.is_writer]
    assert len(writers) == layouts.prefill.dp                               # one writer per replica
    assert sorted(rank for r in roles if r.is_writer for rank in r.ranks) == list(range(layouts.world_size))
    for role in roles:
        assert role.rank in role.ranks and role.num_replicas == layouts.prefill.dp
        assert all(replica_role(layouts, other).replica == role.replica for other in role.ranks)


def test_recipe_layouts_forms():
    two = recipe_layouts(validate_parallel({"prefill": {"pp": 2}, "decode": {"tp": 2}}), 2, cfg())
    assert two == StageLayouts(Layout(pp=2), Layout(tp=2)) and row_label(two) == "prefill=tp1pp2 decode=tp2pp1 dp=1"
    assert recipe_layouts(validate_parallel({"dp": 2}), 2, cfg()) == StageLayouts.static(Layout(dp=2))
    label = validate_parallel("PP2->TP2")                   # a label means what the mapping means
    assert recipe_layouts(label, 2, cfg()) == two and describe_layouts(label) == row_label(two)
    assert describe_layouts(validate_parallel("TP2")) == "tp2pp1 dp=1" and describe_layouts("auto") == "auto"
    assert data_parallel_size(validate_parallel("TP2")) == 1 and data_parallel_size("seesaw") is None
    assert recipe_layouts("auto", 1, cfg()) == StageLayouts.static(Layout())
    assert recipe_layouts("seesaw", 1, cfg()) == StageLayouts.static(Layout())
    assert recipe_layouts("seesaw", 2, cfg()) == StageLayouts(Layout(pp=2), Layout(tp=2))   # no planner: the pair


def test_seesaw_runs_the_pair_only_where_the_planner_predicts_a_gain():
    from seesaw_ds.planner import plan, stage_layouts
    # a small model on two fast-linked devices: data-parallel replicas beat the pair
    small = plan(cfg(), "2xA100-NVLINK", "arxiv-small")
    pair = StageLayouts(Layout(pp=2), Layout(tp=2))
    ratio = next(c for c in small.ranked if stage_layouts(c) == pair).tokens_per_s / small.best_static.tokens_per_s
    assert ratio < 1 and stage_layouts(small.best_static) == StageLayouts.static(Layout(dp=2))
    layouts, why = choose_layouts("seesaw", 2, cfg(), lambda world, _: small)
    assert layouts == StageLayouts.static(Layout(dp=2))
    assert why.startswith(f"parallel: seesaw runs DP2, not the pair PP2->TP2: the planner predicts the pair at "
                          f"{ratio:.2f}x of it for 32 requests of ~1536 prompt + 64 output tokens on 2xA100-NVLINK, "
                          f"under the 1.10x a re-shard must promise")
    assert "`parallel: PP2->TP2` runs the pair anyway" in why
    # 70B on eight PCIe A10s: the pair the planner ranks well above every static layout is run
    big = plan("llama-2-70b", "8xA10", "arxiv")
    best_pair = stage_layouts(big.best_pair)
    assert big.speedup(big.best_pair) >= PAIR_MARGIN
    layouts, why = seesaw_or_static(big, best_pair)
    assert layouts == best_pair and why.startswith(f"parallel: seesaw: the planner predicts {best_pair.label()} at ")
    # a predicted lead under the margin is a tie: the fastest static layout one launch can run is run
    tie = plan("codellama-34b", "4xA10", "sharegpt-small")
    layouts, why = seesaw_or_static(tie, auto_layouts(4, tie.model))
    predicted = float(why.split("predicts the pair at ")[1].split("x")[0])
    assert layouts.is_static and 1.0 <= predicted < PAIR_MARGIN and "under the 1.10x" in why, why
    # auto: the fastest layouts one launch can run, with the prediction
    layouts, why = choose_layouts("auto", 2, cfg(), lambda world, _: small)
    assert layouts == stage_layouts(small.best) and why.startswith("parallel: auto: the planner's fastest for 32 requests")


def faster(cluster, scale):
    """`cluster` with every rate of its device `scale` times higher, its fixed cost per layer that much lower."""
    import dataclasses
    d = cluster.device
    device = dataclasses.replace(d, memory_bandwidth=d.memory_bandwidth * scale,
                                 layer_overhead=d.layer_overhead / scale,
                                 flops=tuple((k, v * scale) for k, v in d.flops),
                                 decode_flops=tuple((k, rows, v * scale) for k, rows, v in d.decode_flops))
    return dataclasses.replace(cluster, device=device)


@pytest.mark.parametrize("parallel", ["seesaw", "auto"])
def test_a_job_folds_into_one_rank_only_where_predicted_the_margin_faster(parallel):
    """Several ranks on one machine run as rank 0 alone on every core (the others idle) where the planner
    predicts that at least FOLD_MARGIN times the N-rank layouts it would choose; the start-up line says so."""
    from seesaw_ds.planner import parse_cluster, plan, stage_layouts
    two = plan(cfg(), "2xA10", "sharegpt-small")
    keep, keep_why = choose_layouts(parallel, 2, cfg(), lambda world, _: two)
    predicted = next(c for c in two.ranked if stage_layouts(c) == keep).tokens_per_s
    for scale, folds in ((1.0, False), (4.0, True)):
        whole = plan(cfg(), faster(parse_cluster("1xA10"), scale), "sharegpt-small")
        ratio = whole.best.tokens_per_s / predicted
        assert (ratio >= FOLD_MARGIN) == folds, ratio
        layouts, why = choose_layouts(parallel, 2, cfg(), lambda world, _: two, lambda _: whole)
        if not folds:
            assert (layouts, why) == (keep, keep_why)
            continue
        assert layouts == StageLayouts.static(Layout())
        assert why == (f"parallel: {parallel} runs one rank on every core (A10), rank 1 idle: the planner predicts "
                       f"it at {ratio:.2f}x {keep.label()}, its choice on 2 ranks, for 128 requests of ~128 prompt + "
                       f"256 output tokens on 2xA10 (no replica re-reads the weights, no all-reduce, no re-shard); "
                       f"give the layouts to run them anyway"), why
        zero, one = replica_role(layouts, 0), replica_role(layouts, 1)
        assert zero.is_writer and zero.single_process_engine and not zero.idle and zero.num_replicas == 1
        assert one.idle and not one.is_writer
    # layouts the recipe names are run as named, whatever one rank is predicted to do
    named, why = choose_layouts(validate_parallel({"dp": 2}), 2, cfg(), lambda world, _: two, lambda _: whole)
    assert named == StageLayouts.static(Layout(dp=2)) and why == ""


def test_seesaw_on_hosts_of_one_rank_keeps_tp_inside_nodes_and_says_so():
    """A job over nodes of one rank plans with TP at most 1 (unless engine.allow_cross_node_tp): the pair's TP
    group would cross the link, and the start-up line names that, not a lack of room."""
    from seesaw_ds.planner import PlannerOptions, plan
    from seesaw_ds.planner.link_fit import TransferFit, nodes_on_link
    from seesaw_ds.planner.clusters import parse_cluster
    link = TransferFit(1e-4, 1e9, 25e6, 0.010)
    spec = nodes_on_link(parse_cluster("2xA10"), link, link, 1, name="A10 (2 nodes of 1, link 25 MB/s)")
    limited = plan(cfg(), spec, "arxiv-small", PlannerOptions(max_tp=1))
    layouts, why = choose_layouts("seesaw", 2, cfg(), lambda world, _: limited)
    assert layouts.is_static and max(layouts.prefill.tp, layouts.decode.tp) == 1
    assert why == (f"parallel: seesaw runs {layouts.label()}, not the pair PP2->TP2: its TP group would span nodes "
                   f"(TP at most 1 here; engine.allow_cross_node_tp lifts it) (32 requests of ~1536 prompt + 64 "
                   f"output tokens on 2xA10 (2 nodes of 1, link 25 MB/s))")


def test_a_job_plans_only_layouts_its_ranks_nodes_can_serve():
    """Two machines of two ranks (no shared /dev/shm): the ranking a job acts on keeps no TP group across
    machines (without the opt-in) and no pair whose KV would cross them; PP4 -> PP2xTP2 stays."""
    from seesaw_ds.jobs.generate import _placeable
    from seesaw_ds.parallel.placement import RankPlace, placement_problems
    from seesaw_ds.planner import PlannerOptions, plan, stage_layouts
    from transformers import LlamaConfig
    model = ModelConfig.from_hf(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4))
    places = [RankPlace(n, n) for n in ("a", "a", "b", "b")]
    ranking = plan(model, "4xA10", "arxiv-small", PlannerOptions())
    kept = _placeable(ranking, places, False, model)
    labels = {stage_layouts(c).label() for c in kept.ranked}
    assert {"PP4->PP2xTP2", "PP2xTP2", "DP4"} <= labels and not labels & {"TP4", "PP4->TP4", "PP2xTP2->TP4"}
    dropped = [c for c in ranking.ranked if c not in kept.ranked]
    assert dropped and all(placement_problems(stage_layouts(c), places, False, model) for c in dropped)


@pytest.mark.parametrize("parallel, world, message", [
    ({"tp": 2}, 1, "world size is 1"),
    ({"dp": 2}, 3, "covers 2 ranks; world size is 3"),
    ({"tp": 4}, 4, "exceeds the model's 2 KV heads"),
    ({"tp": 2, "dp": 2}, 4, "one launch runs either one replica"),
])
def test_recipe_layouts_misfits_name_parallel(parallel, world, message):
    with pytest.raises(RecipeError, match="parallel") as err:
        recipe_layouts(validate_parallel(parallel), world, cfg())
    assert message in str(err.value)


def test_job_world_from_env():
    assert JobWorld.from_env({}) == JobWorld(0, 1, 1)
    assert JobWorld.from_env({"RANK": "1", "WORLD_SIZE": "2"}) == JobWorld(1, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        JobWorld.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_combine_adds_counts_and_takes_the_slowest_wall_time():
    def replica(rows, wall, skipped=0):
        return {"summary": {"rows_written": rows, "already_done": 1, "truncated": 0, "prompt_tokens": 10 * rows,
                            "completion_tokens": 2 * rows, "shards_written": 1, "wall_seconds": wall,
                            "skipped/empty prompt": skipped}, "engine": {"num_switches": 3}}
    report = combine([replica(6, 2.0, 1), replica(4, 4.0)], "tp=1 pp=1 dp=2", 2)
    total = report["total"]
    assert total["rows_written"] == 10 and total["already_done"] == 2 and total["skipped/empty prompt"] == 1
    assert total["wall_seconds"] == 4.0 and total["requests_per_s"] == 2.5 and total["tokens_per_s"] == 30.0
    text = format_report(report)
    assert "empty prompt: 1" in text and "engine, replica 1" in text and "switches 3" in text


def test_wandb_mode_resolution():
    from seesaw_ds.jobs.tracking import resolve_mode
    key, no_key = (lambda: True), (lambda: False)
    assert resolve_mode("online", {}, no_key) == "offline"      # no API key: logged offline
    assert resolve_mode("online", {}, key) == "online"
    assert resolve_mode("online", {"WANDB_MODE": "disabled"}, key) == "disabled"
    assert resolve_mode("disabled", {"WANDB_MODE": "dryrun"}, key) == "offline"
    assert resolve_mode("offline", {}, key) == "offline"
