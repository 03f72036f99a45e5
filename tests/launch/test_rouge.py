"""ROUGE of a hand-made output folder against closed-form counts."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from evals.arxiv_rouge import evaluate, format_table


def test_rouge_matches_hand_counts(tmp_path):
    # "the cat sat" vs "the cat ran": unigrams 2/3, bigrams 1/2 ("the cat"), LCS 2 -> 2/3
    # "a b c d" vs "d c b a": unigrams 4/4, bigrams 0/3, LCS 1 -> 1/4
    rows = [{"id": "x", "row_index": 1, "completion": "the cat sat", "abstract": "the cat ran"},
            {"id": "y", "row_index": 0, "completion": "a b c d", "abstract": "d c b a"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-r000-00000.parquet")
    json.dump({"recipe": {"sampling": {"temperature": 0.7, "top_p": 0.9}, "model": {"name": "m"}}},
              open(tmp_path / "manifest.json", "w"))
    result = evaluate(str(tmp_path))
    assert [r["id"] for r in result["per_row"]] == ["y", "x"]
    f = {r["id"]: r for r in result["per_row"]}
    assert abs(f["x"]["rouge1"] - 2 / 3) < 1e-9 and abs(f["x"]["rouge2"] - 1 / 2) < 1e-9
    assert abs(f["x"]["rougeL"] - 2 / 3) < 1e-9
    assert abs(f["y"]["rouge1"] - 1.0) < 1e-9 and f["y"]["rouge2"] == 0 and abs(f["y"]["rougeL"] - 1 / 4) < 1e-9
    assert abs(result["rouge"]["rouge1"]["fmeasure"] - (2 / 3 + 1) / 2) < 1e-9
    assert result["sampling"]["temperature"] == 0.7
    assert "83.33" in format_table([result])
