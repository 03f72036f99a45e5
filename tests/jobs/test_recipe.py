"""Recipe loading: every key checked, dotted error messages, overrides, --help, malformed YAML."""
import dataclasses
import pathlib
import typing

import pytest

from seesaw_ds.jobs.recipe import Recipe, load_recipe, parse_recipe, recipe_help
from seesaw_ds.jobs.schema import RecipeError

REPO = pathlib.Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"source": "x.jsonl", "columns": {"prompt": "text"}}}


def with_(**sections):
    raw = {"data": dict(MINIMAL["data"])}
    for name, value in sections.items():
        raw[name] = value
    return raw


def error_of(raw, overrides=()):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, overrides)
    return str(info.value)


def test_unknown_key_names_full_dotted_key_and_suggests():
    msg = error_of({"data": {"source": "x", "colums": {"prompt": "p"}}})
    assert msg == "recipe key data.colums is unknown; did you mean data.columns?"
    assert "engine.kv.treshold is unknown; did you mean engine.kv.threshold?" in error_of(
        with_(engine={"kv": {"treshold": 0.5}}))
    assert "recipe key bogus is unknown" in error_of(with_(bogus=1))


@pytest.mark.parametrize("section, value, needle", [
    ("engine", {"max_num_seqs": "abc"}, "engine.max_num_seqs must be int, got 'abc'"),
    ("sampling", {"ignore_eos": 1}, "sampling.ignore_eos must be bool"),
    ("sampling", {"stop_token_ids": 5}, "sampling.stop_token_ids must be a list"),
    ("sampling", {"stop_token_ids": [1, "a"]}, "sampling.stop_token_ids[1] must be int"),
    ("sampling", {"top_p": 0}, "sampling.top_p must be in (0, 1]"),
    ("engine", {"kv": {"threshold": 1.5}}, "engine.kv.threshold must be in [0, 1)"),
    ("output", {"shard_rows": 0}, "output.shard_rows must be >= 1"),
    ("tracking", {"wandb": {"mode": "loud"}}, "tracking.wandb.mode must be one of online, offline, disabled"),
    ("model", {"dtype": "int3"}, "model.dtype must be one of"),
    ("engine", 5, "recipe key engine must be a mapping"),
])
def test_wrong_types_and_values_name_the_key(section, value, needle):
    assert needle in error_of(with_(**{section: value}))


def test_data_needs_exactly_one_prompt_source():
    assert "data.source is required" in error_of({"data": {"columns": {"prompt": "p"}}})
    assert "data.columns needs one of" in error_of({"data": {"source": "x"}})
    msg = error_of({"data": {"source": "x", "columns": {"prompt": "p"}, "template": "{a}"}})
    assert "data.template conflicts with data.columns.prompt" in msg


def test_template_checks():
    assert "data.template is not a valid template" in error_of({"data": {"source": "x", "template": "{a"}})
    msg = error_of({"data": {"source": "x", "template": "{a} {b}", "over_limit": "truncate"}})
    assert "data.truncate_field is needed" in msg
    assert "data.truncate_field must name a field" in error_of(
        {"data": {"source": "x", "template": "{a}", "truncate_field": "b"}})


def test_overrides_are_yaml_typed_and_checked():
    recipe = parse_recipe(MINIMAL, ["sampling.temperature=0.7", "data.limit=10", "sampling.stop_token_ids=[3, 4]",
                                    "sampling.seed=null", "output.dir=out/run1", "--engine.kv.host_gb=8",
                                    "data.columns.prompt=null", "data.template={article} and {title}",
                                    "data.truncate_field=article", "parallel.prefill.pp=2", "parallel.decode.tp=2"])
    assert recipe.sampling.temperature == 0.7 and recipe.data.limit == 10
    assert recipe.sampling.stop_token_ids == (3, 4) and recipe.sampling.seed is None
    assert recipe.engine.kv.host_gb == 8.0 and isinstance(recipe.engine.kv.host_gb, float)
    assert recipe.data.template == "{article} and {title}" and recipe.output.dir == "out/run1"
    assert recipe.parallel == {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}, "dp": 1}
    assert "data.limitt is unknown; did you mean data.limit?" in error_of(MINIMAL, ["data.limitt=3"])
    assert "must look like key.sub=value" in error_of(MINIMAL, ["data.limit"])


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), (None, "seesaw"), ("seesaw", "seesaw"), ({"tp": 2}, {"tp": 2, "pp": 1, "dp": 1}),
    ({"prefill": {"pp": 2}, "decode": {"tp": 2}, "dp": 2}, {"prefill": {"tp": 1, "pp": 2},
                                                           "decode": {"tp": 2, "pp": 1}, "dp": 2}),
    ("AUTO", "auto"), ("TP2", {"tp": 2, "pp": 1, "dp": 1}), ("1proc", {"tp": 1, "pp": 1, "dp": 1}),
    ("pp2->tp2", {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}, "dp": 1}),   # same grammar as LLM()
    ("TP1xDP2", {"tp": 1, "pp": 1, "dp": 2}),
])
def test_parallel_forms(value, expected):
    assert parse_recipe(with_(parallel=value)).parallel == expected


@pytest.mark.parametrize("value, needle", [
    ({"tp": 0}, "parallel.tp must be an int >= 1"), ({"tq": 2}, "parallel.tq is unknown"),
    ({"prefill": {"pp": 2}}, "parallel.decode is required"),
    ("fast", "parallel must be auto (the planner), seesaw, a label (1proc, TP2, PP2, PP2->TP2, ...) or a mapping"),
    (7, "parallel must be auto (the planner), seesaw,"),
    ({"prefill": {"pp": 2}, "decode": {"tp": 4}}, "parallel has prefill on 2 ranks per replica (tp*pp) but decode on"),
    ({"prefill": {"dp": 2}, "decode": {"tp": 2}}, "parallel.prefill.dp is unknown"),
    ({"prefill": {"pp": 2}, "decode": {"tp": 0}}, "recipe key parallel.decode.tp must be an int >= 1, got 0"),
    ("PP2->TQ2", "recipe key parallel.decode is 'tq2' in label 'PP2->TQ2'"),
])
def test_parallel_errors(value, needle):
    assert needle in error_of(with_(parallel=value))


def test_parallel_error_keys_are_dotted_recipe_keys():
    with pytest.raises(RecipeError) as info:
        parse_recipe(with_(parallel={"prefill": {"pp": 0}, "decode": {"tp": 2}}))
    assert info.value.key == "parallel.prefill.pp" and info.value.message == "must be an int >= 1, got 0"


def _leaf_keys(cls, prefix=""):
    keys = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        name = f"{prefix}{field.name}"
        keys += _leaf_keys(tp, name + ".") if dataclasses.is_dataclass(tp) else [name]
    return keys


def test_help_lists_every_key_with_default_and_description():
    text = recipe_help()
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert sorted(lines) == sorted(_leaf_keys(Recipe))
    assert len(lines) > 40
    for key, line in lines.items():
        assert "default: " in line and len(line.split("[")[0].split(None, 1)) == 2, line  # key + description
    assert "default: 0.25" in lines["engine.kv.threshold"] and "default: 'skip'" in lines["data.over_limit"]


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source: x\n  columns: {prompt: p\nsampling:\n  temperature: 0\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "line 4" in msg and "malformed YAML" in msg
    path.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections"):
        load_recipe(str(path))


@pytest.mark.parametrize("name", ["arxiv", "sharegpt", "synthetic"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"))
    assert recipe.output.dir
    assert recipe.engine_config().model == recipe.model.name


def test_arxiv_recipe_names_the_hub_dataset_with_fallback():
    recipe = load_recipe(str(REPO / "recipes" / "arxiv.yaml"))
    assert recipe.data.source == "ccdv/arxiv-summarization" and recipe.data.fallback == "embedded:arxiv-like"
    assert "article" in recipe.data.template_fields() and "abstract" in recipe.data.columns.carry


def test_command_line(capsys):
    from seesaw_ds.jobs.cli import recipe_from_argv
    path = str(REPO / "recipes" / "sharegpt.yaml")
    recipe, args = recipe_from_argv(["--local_rank=1", "--config", path, "sampling.temperature=0.5",
                                     "--data.limit=3"])
    assert recipe.sampling.temperature == 0.5 and recipe.data.limit == 3 and args.local_rank == 1
    with pytest.raises(SystemExit) as info:
        recipe_from_argv(["--config", path, "data.limitt=3"])
    assert info.value.code == 2
    assert "recipe key data.limitt is unknown; did you mean data.limit?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe_from_argv(["--help"])
    out = capsys.readouterr().out
    assert "engine.kv.threshold" in out and "default: 0.25" in out and "--config" in out
