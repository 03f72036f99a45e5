"""The layout-spec grammar: every form normalises, labels round-trip through StageLayouts, bad forms name their part."""
import json

import pytest

from seesaw_ds.parallel.layout import Layout, LayoutSpecError, StageLayouts, parse_layout_spec

SEESAW = {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}}


@pytest.mark.parametrize("spec, normal", [
    (None, "seesaw"), ("seesaw", "seesaw"), (" SeeSaw ", "seesaw"),
    ("1proc", {"tp": 1, "pp": 1, "dp": 1}), ("1PROC", {"tp": 1, "pp": 1, "dp": 1}),
    ("TP1", {"tp": 1, "pp": 1, "dp": None}), ("tp2", {"tp": 2, "pp": 1, "dp": None}),
    ("PP2", {"tp": 1, "pp": 2, "dp": None}), ("PP2->TP2", {**SEESAW, "dp": None}),
    ("pp2xtp2", {"tp": 2, "pp": 2, "dp": None}), ("TP2xDP2", {"tp": 2, "pp": 1, "dp": 2}),
    ("PP2->TP2xDP3", {**SEESAW, "dp": 3}), ("PP2xDP3->TP2xDP3", {**SEESAW, "dp": 3}),
    ({}, {"tp": 1, "pp": 1, "dp": None}), ({"tp": 2}, {"tp": 2, "pp": 1, "dp": None}),
    ({"pp": 2, "dp": 1}, {"tp": 1, "pp": 2, "dp": 1}),
    ({"prefill": {"pp": 2}, "decode": {"tp": 2}}, {**SEESAW, "dp": None}),
    ({"prefill": {"pp": 2}, "decode": {"tp": 2}, "dp": 2}, {**SEESAW, "dp": 2}),
])
def test_forms_normalise(spec, normal):
    assert parse_layout_spec(spec) == normal


@pytest.mark.parametrize("label", ["1proc", "TP2", "PP2", "PP2->TP2", "TP2->PP2", "PP4->TP4", "PP2xTP2",
                                   "PP2->PP2xTP1", "TP3xDP2", "DP4", "PP2xDP2->TP2xDP2", "PP2xTP2->TP4"])
def test_label_round_trip(label):
    layouts = StageLayouts.from_spec(label)
    again = StageLayouts.from_spec(layouts.label())
    assert again == layouts
    if label != "PP2->PP2xTP1":                       # the one non-canonical spelling in the list
        assert layouts.label() == label
    assert StageLayouts.from_spec(json.loads(json.dumps(layouts.spec()))) == layouts   # the mapping too


def test_labels_name_one_replica_unless_dp_is_given():
    assert StageLayouts.from_spec("PP2->TP2", world_size=6) == StageLayouts(Layout(pp=2, dp=3), Layout(tp=2, dp=3))
    assert StageLayouts.from_spec("PP2->TP2") == StageLayouts(Layout(pp=2), Layout(tp=2))
    assert StageLayouts.from_spec("TP1").label() == "1proc" == StageLayouts.from_spec("pp1->tp1").label()
    assert StageLayouts.from_spec("TP2xDP2", world_size=8).world_size == 4       # a pinned dp stays
    with pytest.raises(LayoutSpecError, match="is seesaw: its layouts depend on the model"):
        StageLayouts.from_spec("seesaw")


@pytest.mark.parametrize("spec, message", [
    (0, "parallel must be seesaw, a label (1proc, TP2, PP2, PP2->TP2, ...) or a mapping ({tp: 2}, "),
    ("fast", "parallel must be seesaw, a label (1proc"), ("", "parallel must be seesaw"),
    ("TP", "parallel must be seesaw"), ("auto", "parallel must be seesaw"),
    ("TP0", "parallel.tp must be an int >= 1, got 0"),
    ("PP2->TP0", "parallel.decode.tp must be an int >= 1, got 0"),
    ("PP2->XX2", "parallel.decode is 'xx2' in label 'PP2->XX2'; expected TPn, PPn"),
    ("1proc->TP1", "parallel.prefill is '1proc' in label"),
    ("PP2->TP2->PP2", "parallel label 'PP2->TP2->PP2' has 3 stages"),
    ("TP2xTP2", "parallel names TP twice in label 'TP2xTP2'"),
    ("PP2->TP4", "parallel has prefill on 2 ranks per replica (tp*pp) but decode on 4; they must match"),
    ("PP2xDP2->TP2xDP3", "parallel.dp differs between the stages of label"),
    ({"tp": 0}, "parallel.tp must be an int >= 1, got 0"), ({"tp": True}, "parallel.tp must be an int >= 1"),
    ({"tp": "2"}, "parallel.tp must be an int >= 1, got '2'"), ({"dp": 0}, "parallel.dp must be an int >= 1"),
    ({"ep": 2}, "parallel.ep is unknown; expected one of tp, pp, dp"),
    ({"prefill": {"pp": 2}}, "parallel.decode is required when the other stage is given"),
    ({"decode": {"tp": 2}}, "parallel.prefill is required when the other stage is given"),
    ({"prefill": {"pp": 2}, "decode": {"tp": 2}, "tp": 2}, "parallel.tp is unknown; expected prefill, decode, dp"),
    ({"prefill": 2, "decode": {"tp": 2}}, "parallel.prefill must be a mapping like {tp: 2}, got 2"),
    ({"prefill": {"pp": 0}, "decode": {"tp": 2}}, "parallel.prefill.pp must be an int >= 1, got 0"),
    ({"prefill": {"dp": 2}, "decode": {"tp": 2}}, "parallel.prefill.dp is unknown; expected one of tp, pp (dp is"),
    ({"prefill": {"pp": 2}, "decode": {"tp": 2}, "dp": -1}, "parallel.dp must be an int >= 1, got -1"),
    ({"prefill": {"pp": 2}, "decode": {"tp": 4}}, "has prefill on 2 ranks per replica (tp*pp) but decode on 4"),
])
def test_bad_forms_name_their_part(spec, message):
    with pytest.raises(LayoutSpecError) as err:
        parse_layout_spec(spec)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError) and str(err.value) == f"{err.value.key} {err.value.message}"


def test_callers_can_list_their_own_forms():
    with pytest.raises(LayoutSpecError, match="must be auto, seesaw, a label"):
        parse_layout_spec("fast", also=("auto",))
