"""Shard folder: atomic shards, documented load call, leftovers, fingerprint refusal, replicas' shard names."""
import json
import os

import datasets
import pyarrow.parquet as pq
import pytest

from seesaw_ds.jobs.outputs import (MANIFEST_NAME, OutputError, ShardWriter, existing_shards, job_fingerprint,
                                    output_schema, prepare_output_dir, read_completed_ids)
from seesaw_ds.jobs.recipe import parse_recipe


def recipe_for(out_dir, **changes):
    raw = {"data": {"source": "in.jsonl", "columns": {"prompt": "text"}}, "output": {"dir": str(out_dir)}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return parse_recipe(raw)


def row(i, **extra):
    return {"id": f"id{i}", "row_index": i, "prompt": f"p{i}", "completion": f"c{i}", "prompt_tokens": 2,
            "completion_tokens": 2, "finish_reason": "length", "temperature": 0.0, "top_k": -1, "top_p": 1.0,
            "max_tokens": 2, "seed": None, "model": "m", "layouts": "auto", "prompt_token_ids": [1, i],
            "completion_token_ids": [i, 1], **extra}


def prepared(tmp_path, **changes):
    recipe = recipe_for(tmp_path / "out", **changes)
    return prepare_output_dir(recipe.output, job_fingerprint(recipe, "in.jsonl"), recipe), recipe


def test_shards_load_with_the_documented_call(tmp_path):
    directory, _ = prepared(tmp_path)
    writer = ShardWriter(directory, 0, output_schema(True, {"ref": None}))  # carry type unknown: from the rows
    for i in range(5):
        writer.add(row(i, ref=f"r{i}"))
    assert writer.flush(3).endswith("part-r000-00000.parquet") and len(writer.rows) == 2
    assert writer.flush().endswith("part-r000-00001.parquet") and writer.flush() is None
    loaded = datasets.load_dataset("parquet", data_files=f"{directory}/part-*.parquet", split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded.to_list(), key=lambda r: r["row_index"]) == [row(i, ref=f"r{i}") for i in range(5)]
    manifest = json.loads(open(os.path.join(directory, MANIFEST_NAME)).read())
    assert manifest["load"] == f'datasets.load_dataset("parquet", data_files="{directory}/part-*.parquet", ' \
                               f'split="train")'
    assert manifest["fingerprint"]["sampling.temperature"] == 0.0


def test_resume_reads_ids_and_ignores_and_cleans_leftovers(tmp_path):
    directory, _ = prepared(tmp_path)
    writer = ShardWriter(directory, 0, output_schema(True))
    writer.add(row(0))
    writer.add(row(1))
    writer.flush()
    # a write cut short by kill -9: a temporary file holding half a parquet file
    whole = open(os.path.join(directory, "part-r000-00000.parquet"), "rb").read()
    leftover = os.path.join(directory, ".tmp-part-r000-00001.parquet.4242")
    open(leftover, "wb").write(whole[: len(whole) // 2])
    other_replica = os.path.join(directory, ".tmp-part-r001-00000.parquet.4243")
    open(other_replica, "wb").write(b"in flight")
    assert read_completed_ids(directory) == {"id0", "id1"}
    resumed = ShardWriter(directory, 0, output_schema(True))
    assert resumed.done_ids == {"id0", "id1"} and resumed.next_seq == 1 and resumed.removed_leftovers == 1
    assert not os.path.exists(leftover) and os.path.exists(other_replica)  # only its own replica's leftovers
    resumed.add(row(2))
    assert resumed.flush().endswith("part-r000-00001.parquet")
    assert read_completed_ids(directory) == {"id0", "id1", "id2"}


def test_replicas_write_disjoint_shard_names(tmp_path):
    directory, _ = prepared(tmp_path)
    writers = [ShardWriter(directory, r, output_schema(False)) for r in range(2)]
    for r, writer in enumerate(writers):
        for i in range(r, 6, 2):
            writer.add({k: v for k, v in row(i).items() if not k.endswith("token_ids")})
            writer.flush()
    names = [os.path.basename(p) for _, _, p in existing_shards(directory)]
    assert names == [f"part-r000-{s:05d}.parquet" for s in range(3)] + [f"part-r001-{s:05d}.parquet" for s in range(3)]
    assert read_completed_ids(directory) == {f"id{i}" for i in range(6)}


def test_changed_recipe_is_refused_with_what_changed(tmp_path):
    directory, _ = prepared(tmp_path)
    ShardWriter(directory, 0, output_schema(True)).add(row(0))
    with pytest.raises(OutputError, match=r"sampling.temperature changed from 0.0 to 0.7; use a new output.dir "
                                          r"or output.overwrite=true"):
        prepared(tmp_path, sampling__temperature=0.7)
    with pytest.raises(OutputError, match=r"data.template changed from null to \"\{text\}\""):
        recipe = parse_recipe({"data": {"source": "in.jsonl", "template": "{text}"},
                               "output": {"dir": str(tmp_path / "out")}})
        prepare_output_dir(recipe.output, job_fingerprint(recipe, "in.jsonl"), recipe)
    # the same job again is accepted; streaming and engine sizes do not change the rows
    prepared(tmp_path, data__streaming=True, engine__max_num_seqs=8)
    # nor does `error` instead of `skip`: the job stops at the row that skip leaves out (truncate does change them)
    prepared(tmp_path, data__bad_rows="error", data__over_limit="error")
    with pytest.raises(OutputError, match=r"data.over_limit changed from \"skip\" to \"truncate\""):
        prepared(tmp_path, data__over_limit="truncate")


def test_overwrite_and_resume_false(tmp_path):
    directory, _ = prepared(tmp_path)
    writer = ShardWriter(directory, 0, output_schema(True))
    writer.add(row(0))
    writer.flush()
    with pytest.raises(OutputError, match=r"already has 1 shards and output.resume is false"):
        prepared(tmp_path, output__resume=False)
    prepared(tmp_path, output__overwrite=True, sampling__temperature=0.5)
    assert existing_shards(directory) == []
    manifest = json.loads(open(os.path.join(directory, MANIFEST_NAME)).read())
    assert manifest["fingerprint"]["sampling.temperature"] == 0.5


def test_shards_without_manifest_are_refused(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    pq.write_table(output_schema(False).empty_table(), str(directory / "part-r000-00000.parquet"))
    with pytest.raises(OutputError, match=r"has 1 shards but no manifest.json"):
        prepared(tmp_path)


def test_a_carry_column_all_none_in_the_first_shard_takes_its_type_later(tmp_path):
    """The first shard's `ref` values are all None: it must not fix the column to Arrow's null type; later
    shards (and a resumed writer) write strings, and the folder loads with the documented call."""
    directory, _ = prepared(tmp_path)
    writer = ShardWriter(directory, 0, output_schema(True, {"ref": None}))
    for i in range(3):
        writer.add(row(i, ref=None))
    writer.flush()
    for i in range(3, 6):
        writer.add(row(i, ref=f"r{i}"))
    writer.flush()
    resumed = ShardWriter(directory, 0, output_schema(True, {"ref": None}))
    resumed.add(row(6, ref="r6"))
    resumed.flush()
    assert resumed.schema.field("ref").type == "string"
    loaded = datasets.load_dataset("parquet", data_files=f"{directory}/part-*.parquet", split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert {r["id"]: r["ref"] for r in loaded} == {f"id{i}": (None if i < 3 else f"r{i}") for i in range(7)}


def test_content_changes_are_named(tmp_path):
    recipe = recipe_for(tmp_path / "out")
    old = job_fingerprint(recipe, "in.jsonl", "checkpoint aaa", "file size=1")
    prepare_output_dir(recipe.output, old, recipe)
    for new, says in ((job_fingerprint(recipe, "in.jsonl", "checkpoint bbb", "file size=1"),
                       "the model's weights at embedded:smollm2 changed since these rows were made"),
                      (job_fingerprint(recipe, "in.jsonl", "checkpoint aaa", "file size=2"),
                       "the data at in.jsonl changed since these rows were made")):
        with pytest.raises(OutputError, match=says):
            prepare_output_dir(recipe.output, new, recipe)
