import pytest

from seesaw_ds.parallel.layout import Layout, StageLayouts, auto_layouts, resolve_layouts


def test_layout_fields_are_validated():
    with pytest.raises(ValueError, match="Layout.tp"):
        Layout(tp=0)
    with pytest.raises(ValueError, match="Layout.dp"):
        Layout(dp=True)
    assert Layout(tp=2, pp=3, dp=2).world_size == 12


def test_rank_mapping_round_trip_and_order():
    layout = Layout(tp=2, pp=3, dp=2)
    seen = set()
    for rank in range(layout.world_size):
        dp_index, pp_stage, tp_rank, local = layout.coords(rank)
        assert layout.global_rank(dp_index, pp_stage, tp_rank) == rank
        assert local == pp_stage * 2 + tp_rank
        seen.add((dp_index, pp_stage, tp_rank))
    assert len(seen) == 12
    assert layout.replica_ranks(1) == list(range(6, 12))  # a replica is a contiguous block
    assert layout.tp_group_ranks(0, 2) == [4, 5]
    assert layout.pp_group_ranks(1, 1) == [7, 9, 11]
    with pytest.raises(ValueError, match="outside"):
        layout.coords(12)


def test_rank_order_matches_deepspeed_process_topology():
    from deepspeed.runtime.pipe.topology import ProcessTopology
    layout = Layout(tp=2, pp=2, dp=3)
    axes, dims = layout.topology_axes()
    topo = ProcessTopology(axes=axes, dims=dims)
    for rank in range(layout.world_size):
        c = topo.get_coord(rank)
        assert (c.data, c.pipe, c.model) == layout.coords(rank)[:3]


def test_validate_messages(make_cfg):
    cfg = make_cfg(num_layers=4, num_kv_heads=3, num_heads=9)
    with pytest.raises(ValueError, match="decode tp=4 needs 4 ranks per replica; world size is 2"):
        resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 4}}, 2, cfg)
    with pytest.raises(ValueError, match="prefill pp=5 exceeds the model's 4 layers"):
        resolve_layouts({"prefill": {"pp": 5}, "decode": {"tp": 5}}, 5, cfg)
    with pytest.raises(ValueError, match="decode tp=4 exceeds the model's 3 KV heads"):
        resolve_layouts({"prefill": {"pp": 4}, "decode": {"tp": 4}}, 4, cfg)
    with pytest.raises(ValueError, match="covers 2 ranks; world size is 3"):
        resolve_layouts({"tp": 2}, 3, cfg)
    with pytest.raises(ValueError, match="dp=2 differs from prefill dp=1"):
        StageLayouts(prefill=Layout(pp=2), decode=Layout(dp=2))
    with pytest.raises(ValueError, match="tp\\*pp=1 differs"):
        StageLayouts(prefill=Layout(pp=2), decode=Layout())
    with pytest.raises(ValueError, match="unknown layout keys"):
        resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 2}, "extra": {}}, 2, cfg)
    with pytest.raises(ValueError, match="unknown layout keys \\['ep'\\]"):
        Layout.from_dict({"ep": 2})


def test_parse_per_stage_and_static(make_cfg):
    cfg = make_cfg()
    layouts = resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 2}}, 4, cfg)
    assert layouts == StageLayouts(Layout(pp=2, dp=2), Layout(tp=2, dp=2))
    assert not layouts.is_static
    static = resolve_layouts({"tp": 2, "dp": 1}, 2, cfg)
    assert static.is_static and static.decode == Layout(tp=2)
    assert resolve_layouts(None, 2, cfg) == auto_layouts(2, cfg)


@pytest.mark.parametrize("world, layers, kv, replica", [
    (1, 7, 3, 1), (2, 7, 3, 2), (3, 7, 3, 3), (4, 7, 3, 2), (4, 30, 8, 4), (4, 1, 8, 1), (6, 7, 3, 3),
    (8, 7, 4, 4),
])
def test_auto_layouts(make_cfg, world, layers, kv, replica):
    cfg = make_cfg(num_layers=layers, num_kv_heads=kv, num_heads=kv * 2)
    layouts = auto_layouts(world, cfg)
    assert layouts.prefill == Layout(pp=replica, dp=world // replica)
    assert layouts.decode == Layout(tp=replica, dp=world // replica)
    layouts.validate(world, cfg)
