from seesaw_ds.data import INSTRUCTION, arxiv_like_dataset, arxiv_like_requests
from seesaw_ds.data.arxiv_like import CHARS_PER_TOKEN


def test_article_token_counts_in_range(smollm2_tokenizer, sharegpt_rows):
    rows = arxiv_like_dataset(6, seed=5, tokenizer=smollm2_tokenizer, dataset=sharegpt_rows)
    counts = [len(smollm2_tokenizer.encode(a, add_special_tokens=False)) for a in rows["article"]]
    assert all(1500 <= n <= 3000 for n in counts), counts
    assert len(set(rows["article"])) == 6
    for row in rows:
        assert row["prompt"] == f"{INSTRUCTION}\n\n{row['article']}"
        assert row["abstract"] and " ".join(row["article"].split()).startswith(row["abstract"])


def test_same_seed_same_rows_other_seed_other_rows(sharegpt_rows):
    a = arxiv_like_dataset(4, seed=2, dataset=sharegpt_rows)
    assert a.to_dict() == arxiv_like_dataset(4, seed=2, dataset=sharegpt_rows).to_dict()
    assert a["article"] != arxiv_like_dataset(4, seed=3, dataset=sharegpt_rows)["article"]


def test_character_estimate_without_tokenizer(sharegpt_rows):
    rows = arxiv_like_dataset(5, seed=0, min_tokens=400, max_tokens=900, dataset=sharegpt_rows)
    for article in rows["article"]:
        assert 400 * CHARS_PER_TOKEN - CHARS_PER_TOKEN <= len(article) <= 900 * CHARS_PER_TOKEN


def test_requests_have_exact_prompt_length_and_start_with_the_instruction(smollm2_tokenizer, sharegpt_rows):
    reqs = arxiv_like_requests(smollm2_tokenizer, 3, prompt_len=1536, output_len=64, seed=1, dataset=sharegpt_rows)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(1536, 64)] * 3
    assert all(smollm2_tokenizer.decode(r.prompt_token_ids).startswith(INSTRUCTION) for r in reqs)
    assert len({r.prompt_token_ids for r in reqs}) == 3
