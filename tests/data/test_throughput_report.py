import pytest

from evals.peers.common import counted_tokens
from evals.throughput_report import format_table, result_rows
from evals.workloads import WORKLOADS, parse_workload_names


def _run(engine, layout, wall_by_workload, generated=None):
    results = []
    for name, wall in wall_by_workload.items():
        results.append({"workload": name, "wall_s": wall, "requests": 2, "prompt_tokens": 300,
                        "output_tokens": 100, "generated_tokens": 100 if generated is None else generated,
                        "short_requests": 0 if generated is None else 1, "extra": {}})
    return {"engine": engine, "layout": layout, "dtype": "bfloat16", "results": results}


def test_rates_and_ratios_against_hf_and_the_best_vllm_row():
    runs = [_run("hf", "1proc", {"a": 4.0}), _run("vllm", "TP1", {"a": 1.0}), _run("vllm", "PP2", {"a": 2.0}),
            _run("seesaw", "1proc", {"a": 0.8}, generated=99)]
    rows = {(r["engine"], r["layout"]): r for r in result_rows(runs)}
    seesaw = rows[("seesaw", "1proc")]
    assert seesaw["tokens_per_s"] == pytest.approx(400 / 0.8)
    assert seesaw["output_tokens_per_s"] == pytest.approx(100 / 0.8)
    assert seesaw["vs_hf"] == pytest.approx(4.0 / 0.8)
    assert seesaw["vs_vllm"] == pytest.approx(1.0 / 0.8)      # best vLLM row: TP1, 400 tokens/s
    assert rows[("vllm", "PP2")]["vs_vllm"] == pytest.approx(0.5)
    assert not seesaw["exact_lengths"] and rows[("hf", "1proc")]["exact_lengths"]
    assert "NO" in format_table(list(rows.values()))


def test_counted_tokens_caps_extra_generation_per_request():
    requests = [{"prompt_token_ids": [1, 2, 3], "output_len": 4}, {"prompt_token_ids": [5], "output_len": 2}]
    assert counted_tokens(requests, [6, 1]) == {"requests": 2, "prompt_tokens": 4, "output_tokens": 6,
                                                "generated_tokens": 5, "short_requests": 1}


def test_workload_names_are_checked():
    assert parse_workload_names("arxiv, fixed-b") == ["arxiv", "fixed-b"]
    with pytest.raises(ValueError, match="unknown workload"):
        parse_workload_names("arxiv,gsm8k")
    assert WORKLOADS["sharegpt"].scaled(0.25).num_requests == 32
    assert WORKLOADS["arxiv"].scaled(0.001).num_requests == 1


def test_stage_table_reads_the_engine_counters():
    from evals.throughput_report import format_stage_table
    run = _run("seesaw", "PP2->TP2", {"a": 2.0})
    run["results"][0]["extra"] = {"num_switches": 3, "prefill_s": 1.25, "decode_s": 4.0, "switch_s": 0.02,
                                  "prefetch_stall_s": 0.2, "decode_steps": 10, "decode_tokens": 55}
    table = format_stage_table(result_rows([run, _run("hf", "1proc", {"a": 1.0})]))
    lines = table.splitlines()
    assert len(lines) == 2 and "hf" not in table                          # header + the one seesaw row
    assert lines[1].split() == ["a", "PP2->TP2", "3", "1.2", "4.0", "0.02", "5.0", "5.5"]
