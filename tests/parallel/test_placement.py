"""Placement checks: which layouts the ranks' nodes can serve (a TP group inside one node unless allowed; a
switching pair inside one /dev/shm), and the one-line error a job prints for the rest."""
import pytest

from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.parallel.layout import StageLayouts
from seesaw_ds.parallel.placement import (PlacementError, Problem, RankPlace, check_placement,
                                          placement_problems)


def machines(*nodes):
    """One place per rank: separate machines (each node its own /dev/shm)."""
    return [RankPlace(node, node) for node in nodes]


def hosts_of_one_machine(*nodes):
    """One place per rank: namespaced hosts of one machine (distinct node keys, one shared /dev/shm)."""
    return [RankPlace(node, "machine") for node in nodes]


def keys(problems):
    return [p.key for p in problems]


@pytest.mark.parametrize("label, nodes", [
    ("1proc", "a"),
    ("TP2", "aa"),
    ("PP2", "ab"),                 # PP across nodes: one activation per stage boundary
    ("PP4", "abcd"),
    ("PP2xTP2", "aabb"),           # PP across nodes, TP inside each
    ("TP2xDP2", "aabb"),           # each replica inside a node
    ("TP1xDP2", "ab"),             # DP replicas on different nodes
    ("PP2->TP2", "aa"),            # a switching pair inside one node
    ("PP2xDP2->TP2xDP2", "aabb"),  # two switching replicas, each inside its node
    ("PP4->TP4", "aaaa"),
])
def test_layouts_the_nodes_can_serve(label, nodes):
    assert placement_problems(StageLayouts.from_spec(label, len(nodes)), machines(*nodes)) == []


def test_static_tp_across_nodes_is_refused_naming_the_key_the_ranks_and_the_opt_in():
    [problem] = placement_problems(StageLayouts.from_spec("TP2"), machines("h0", "h1"))
    assert problem.key == "parallel.tp"
    assert "tp=2 puts a TP group across nodes: node h0 (rank 0), node h1 (rank 1)" in problem.message
    assert "engine.allow_cross_node_tp" in problem.message and "more" not in problem.message


def test_explicit_opt_in_allows_tp_across_nodes():
    layouts = StageLayouts.from_spec("TP2")
    assert placement_problems(layouts, machines("h0", "h1"), allow_cross_node_tp=True) == []
    check_placement(layouts, machines("h0", "h1"), allow_cross_node_tp=True)


def test_interleaved_ranks_put_every_tp_group_across_nodes():
    [problem] = placement_problems(StageLayouts.from_spec("PP2xTP2"), machines("a", "b", "a", "b"))
    assert problem.key == "parallel.tp"
    assert "node a (rank 0), node b (rank 1) (and 1 more TP group)" in problem.message
    [problem] = placement_problems(StageLayouts.from_spec("TP2xDP3", 6), machines(*"ababab"))
    assert "(and 2 more TP groups)" in problem.message


def test_tp_group_over_three_ranks_groups_them_by_node():
    [problem] = placement_problems(StageLayouts.from_spec("TP3"), machines("a", "a", "b"))
    assert "node a (ranks 0, 1), node b (rank 2)" in problem.message


def test_only_the_stage_whose_tp_spans_nodes_is_named():
    """PP2 -> TP2 on namespaced hosts of one machine: prefill (PP) is fine, decode's TP group is not; the
    shared /dev/shm serves the host store."""
    layouts = StageLayouts.from_spec("PP2->TP2")
    [problem] = placement_problems(layouts, hosts_of_one_machine("h0", "h1"))
    assert problem.key == "parallel.decode.tp" and problem.message.startswith("decode tp=2 ")
    assert placement_problems(layouts, hosts_of_one_machine("h0", "h1"), allow_cross_node_tp=True) == []
    [problem] = placement_problems(StageLayouts.from_spec("TP2->PP2"), hosts_of_one_machine("h0", "h1"))
    assert problem.key == "parallel.prefill.tp"


def test_switching_pair_across_machines_is_refused_even_with_the_opt_in():
    layouts = StageLayouts.from_spec("PP2->TP2")
    assert keys(placement_problems(layouts, machines("h0", "h1"))) == ["parallel.decode.tp", "parallel"]
    [problem] = placement_problems(layouts, machines("h0", "h1"), allow_cross_node_tp=True)
    assert problem.key == "parallel"
    assert problem.message.startswith("prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1 switches stages through "
                                      "the host KV store")
    assert "replica 0 spans nodes that do not share one: node h0 (rank 0), node h1 (rank 1)" in problem.message


def test_pp_across_nodes_for_prefill_with_tp_inside_each_node_for_decode_keeps_its_kv_at_home():
    """2 nodes x 2 ranks, prefill PP4 across both, decode PP2xTP2 with each TP group inside one node: every KV
    move of the re-shard plan stays inside a node, so each node's own host store serves it. Without the model
    the plan is unknown and the replica must share one /dev/shm."""
    from seesaw_ds.models.config import ModelConfig
    cfg = ModelConfig.from_hf({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64,
                               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 100})
    layouts = StageLayouts.from_spec("PP4->PP2xTP2")
    assert placement_problems(layouts, machines("a", "a", "b", "b"), cfg=cfg) == []
    [problem] = placement_problems(layouts, machines("a", "a", "b", "b"))
    assert problem.key == "parallel"
    assert "node a (ranks 0, 1), node b (ranks 2, 3)" in problem.message
    assert placement_problems(layouts, hosts_of_one_machine("a", "a", "b", "b")) == []   # one /dev/shm: fine
    # the KV of PP2 -> TP2 over two machines crosses them (half of every layer's heads): refused with the model too
    [problem] = placement_problems(StageLayouts.from_spec("PP2->TP2"), machines("h0", "h1"), True, cfg)
    assert "and its KV moves between them" in problem.message


def test_switching_replicas_split_across_machines_are_counted():
    layouts = StageLayouts.from_spec("PP2xDP2->TP2xDP2")
    problems = placement_problems(layouts, machines("a", "b", "a", "b"), allow_cross_node_tp=True)
    assert keys(problems) == ["parallel"] and "replica 0 spans" in problems[0].message
    assert "(and 1 more replica)" in problems[0].message
    problems = placement_problems(layouts, machines("a", "a", "a", "b"), allow_cross_node_tp=True)
    assert "replica 1 spans" in problems[0].message and "more" not in problems[0].message


def test_host_store_domains_are_named_by_their_nodes():
    """Containers of one box: two sharing the host's /dev/shm, one with its own."""
    places = [RankPlace("c0", "box"), RankPlace("c1", "box"), RankPlace("c2", "c2-private")]
    [problem] = placement_problems(StageLayouts.from_spec("PP3->TP3"), places, allow_cross_node_tp=True)
    assert "node c0, c1 (ranks 0, 1), node c2 (rank 2)" in problem.message


def test_places_must_cover_the_world():
    with pytest.raises(ValueError, match="3 rank places for layouts over 2 ranks"):
        placement_problems(StageLayouts.from_spec("TP2"), machines("a", "a", "b"))


def test_placement_error_is_one_recipe_error_line_with_every_problem():
    with pytest.raises(PlacementError) as caught:
        check_placement(StageLayouts.from_spec("PP2->TP2"), machines("h0", "h1"))
    err = caught.value
    assert isinstance(err, RecipeError) and isinstance(err, ValueError)   # a job's bad input: exit 2
    assert err.key == "parallel.decode.tp" and len(err.problems) == 2
    text = str(err)
    assert "\n" not in text and text.startswith("recipe key parallel.decode.tp decode tp=2 puts a TP group")
    assert "; prefill tp=1 pp=2 dp=1 -> decode" in text
    assert PlacementError([Problem("parallel", "x")]).problems == (Problem("parallel", "x"),)
