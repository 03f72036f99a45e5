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
    with pytest.raises(ValueError, match="prefill pp=4 needs 4 ranks per replica; world size is 2"):
        resolve_layouts({"prefill": {"pp": 4}, "decode": {"tp": 4}}, 2, cfg)
    with pytest.raises(ValueError, match="prefill pp=2 needs 2 ranks per replica; world size is 1"):
        resolve_layouts("PP2->TP2", 1, cfg)
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
    with pytest.raises(ValueError, match="parallel.extra is unknown; expected prefill, decode, dp"):
        resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 2}, "extra": {}}, 2, cfg)
    with pytest.raises(ValueError, match="parallel.ep is unknown; expected one of tp, pp, dp"):
        resolve_layouts({"ep": 2}, 2, cfg)
    with pytest.raises(ValueError, match="has prefill on 2 ranks per replica \\(tp\\*pp\\) but decode on 4"):
        resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 4}}, 2, cfg)


def test_parse_per_stage_and_static(make_cfg):
    cfg = make_cfg()
    layouts = resolve_layouts({"prefill": {"pp": 2}, "decode": {"tp": 2}}, 4, cfg)
    assert layouts == StageLayouts(Layout(pp=2, dp=2), Layout(tp=2, dp=2))
    assert not layouts.is_static
    static = resolve_layouts({"tp": 2, "dp": 1}, 2, cfg)
    assert static.is_static and static.decode == Layout(tp=2)
    assert resolve_layouts(None, 2, cfg) == auto_layouts(2, cfg) == resolve_layouts("Seesaw", 2, cfg)
    assert resolve_layouts({}, 2, cfg) == StageLayouts.static(Layout(dp=2))       # {} pins nothing: DP fills
    assert resolve_layouts(layouts, 4, cfg) is layouts                            # StageLayouts: checked as is
    with pytest.raises(ValueError, match="covers 4 ranks; world size is 2"):
        resolve_layouts(layouts, 2, cfg)


@pytest.mark.parametrize("label, world, expected", [
    ("1proc", 1, StageLayouts.static(Layout())),
    ("tp1", 1, StageLayouts.static(Layout())),
    ("TP2", 2, StageLayouts.static(Layout(tp=2))),
    ("TP2", 4, StageLayouts.static(Layout(tp=2, dp=2))),                      # no DP in the label: it fills
    ("pp2", 2, StageLayouts.static(Layout(pp=2))),
    ("PP2->TP2", 2, StageLayouts(Layout(pp=2), Layout(tp=2))),
    (" pp2 -> tp2 ", 2, StageLayouts(Layout(pp=2), Layout(tp=2))),
    ("PP2xTP2", 4, StageLayouts.static(Layout(tp=2, pp=2))),
    ("TP2xDP2", 4, StageLayouts.static(Layout(tp=2, dp=2))),
])
def test_labels_resolve(make_cfg, label, world, expected):
    cfg = make_cfg(num_kv_heads=4, num_heads=8)
    assert resolve_layouts(label, world, cfg) == expected


def test_printers():
    seesaw = StageLayouts(Layout(pp=2), Layout(tp=2))
    assert seesaw.describe() == "prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1"
    assert seesaw.describe(compact=True) == "prefill=tp1pp2 decode=tp2pp1 dp=1"
    assert seesaw.label() == "PP2->TP2"
    static = StageLayouts.static(Layout(tp=2, dp=3))
    assert static.describe() == "tp=2 pp=1 dp=3" and static.describe(compact=True) == "tp2pp1 dp=3"
    assert static.label() == "TP2xDP3"
    assert StageLayouts.static(Layout()).label() == "1proc"
    assert StageLayouts.static(Layout(dp=2)).label() == "DP2"
    assert StageLayouts(Layout(pp=2, dp=2), Layout(tp=2, dp=2)).label() == "PP2xDP2->TP2xDP2"


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
