import json

import numpy as np
import pytest

from seesaw_ds.data import BenchRequest, ShareGPTFilter, sample_sharegpt_requests
from seesaw_ds.data.sharegpt import first_exchange, iter_json_array_records, sharegpt_json_path


@pytest.mark.parametrize("prompt_len, output_len, max_model_len, expected", [
    (100, 20, None, True), (99, 20, None, False), (100, 19, None, False),
    (4076, 20, None, True), (4077, 20, None, False), (100, 3996, None, True), (100, 3997, None, False),
    (2028, 20, 2048, True), (2029, 20, 2048, False), (3000, 500, 8192, True), (4000, 500, 8192, False),
])
def test_filter_length_rules(prompt_len, output_len, max_model_len, expected):
    assert ShareGPTFilter(max_model_len=max_model_len).accepts(prompt_len, output_len) is expected


def test_filter_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        ShareGPTFilter(min_prompt_tokens=0)
    with pytest.raises(ValueError, match="max_model_len"):
        ShareGPTFilter(max_model_len=-1)
    with pytest.raises(ValueError, match="no request could pass"):
        ShareGPTFilter(max_model_len=64)


def test_reader_keeps_complete_records_of_a_truncated_file():
    text = ('[\n {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},'
            '\n {"id": "b", "conversations": [{"from": "human", "value": "unfinish')
    assert [r["id"] for r in iter_json_array_records(text)] == ["a"]
    assert [r["id"] for r in iter_json_array_records('[{"id": 1}, {"id": 2}]')] == [1, 2]


def test_first_exchange_is_first_human_turn_and_the_answer_after_it():
    h, g = ({"from": "human", "value": "q"}), ({"from": "gpt", "value": "a"})
    assert first_exchange([g, dict(h, value="q1"), dict(g, value="a1"), h, g]) == ("q1", "a1")
    assert first_exchange([h, dict(h, value="q2"), g]) is None      # a human turn must be answered
    assert first_exchange([g]) is None


def test_dataset_rows_match_the_raw_file(sharegpt_rows):
    assert sharegpt_rows.column_names == ["id", "prompt", "reference"]
    assert len(sharegpt_rows) > 15000
    text = sharegpt_json_path().read_text(encoding="utf-8")
    first, _ = json.JSONDecoder().raw_decode(text, text.index("{"))
    conv = first["conversations"]
    assert sharegpt_rows[0] == {"id": first["id"], "prompt": conv[0]["value"], "reference": conv[1]["value"]}


def _reference_sample(tokenizer, rows, n, seed, limit):
    """One row at a time, rules spelled out: the first n passing rows in default_rng(seed) order."""
    picked = []
    for index in np.random.default_rng(seed).permutation(len(rows)):
        row = rows[int(index)]
        prompt = tokenizer.encode(row["prompt"])
        out_len = len(tokenizer.encode(row["reference"], add_special_tokens=False))
        if len(prompt) >= 100 and out_len >= 20 and len(prompt) + out_len <= limit:
            picked.append((tuple(prompt), out_len))
            if len(picked) == n:
                return picked


def test_sample_matches_a_row_by_row_reference(smollm2_tokenizer, sharegpt_rows):
    got = sample_sharegpt_requests(smollm2_tokenizer, 12, seed=3, max_total_tokens=4096, max_model_len=2048,
                                   dataset=sharegpt_rows, chunk_size=5)
    want = _reference_sample(smollm2_tokenizer, sharegpt_rows, 12, seed=3, limit=2048)
    assert [(r.prompt_token_ids, r.output_len) for r in got] == want
    assert all(isinstance(r, BenchRequest) for r in got)


def test_sample_is_deterministic_per_seed(smollm2_tokenizer, sharegpt_rows):
    a = sample_sharegpt_requests(smollm2_tokenizer, 8, seed=0, dataset=sharegpt_rows)
    b = sample_sharegpt_requests(smollm2_tokenizer, 8, seed=0, dataset=sharegpt_rows)
    c = sample_sharegpt_requests(smollm2_tokenizer, 8, seed=1, dataset=sharegpt_rows)
    assert a == b
    assert a != c
    prompt_ids, output_len = a[0]  # unpacks as (prompt_token_ids, output_len)
    assert prompt_ids == list(a[0].prompt_token_ids) and output_len == a[0].output_len


def test_sample_asks_for_more_than_exists(smollm2_tokenizer, sharegpt_rows):
    with pytest.raises(ValueError, match="pass"):
        sample_sharegpt_requests(smollm2_tokenizer, 50, dataset=sharegpt_rows.select(range(20)))
