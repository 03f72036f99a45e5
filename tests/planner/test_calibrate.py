"""Calibration of the local machine: real gloo ranks, short loops, cached JSON re-used."""
import json
import os
import subprocess
import sys
import time

import pytest

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.planner import calibrate, parse_cluster, parse_workload, plan_layouts

PLAN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch", "plan.py")

# SmolLM2-135M's shape (the model the CPU benchmarks run)
SMOLLM2 = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "rope_theta": 100000.0, "tie_word_embeddings": True}


@pytest.mark.slow
def test_local_calibration_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("SEESAW_CACHE", str(tmp_path))
    start = time.perf_counter()
    measured = calibrate.load_or_measure(2, seconds=0.05)
    elapsed = time.perf_counter() - start
    assert elapsed < 180, f"calibration took {elapsed:.0f}s"   # the first run may build DeepSpeed's shm op
    assert set(measured["matmul_flops"]) == {"float32", "bfloat16"}
    assert all(v > 1e8 for v in measured["matmul_flops"].values())        # > 0.1 GFLOP/s per rank
    assert measured["copy_bandwidth"] > 1e8 and measured["p2p"]["bandwidth"] > 1e6
    assert measured["allreduce"]["2"]["latency"] > 0 and measured["allreduce"]["2"]["bandwidth"] > 1e6
    # AutoTP's all-reduce (DeepSpeed's shared-memory op here) is what the TP terms use
    assert measured["tp_allreduce"]["2"]["latency"] > 0 and measured["tp_allreduce"]["2"]["bandwidth"] > 1e6
    assert 0 < measured["layer_overhead"] < 0.1
    # decode's few-row linears, fp32 and bf16 (the packed kernel where it is here): a rate per row count,
    # more rows doing more FLOPs per byte read
    decode, decode_bf16 = measured["decode_linear_flops"]["float32"], measured["decode_linear_flops"]["bfloat16"]
    assert set(decode) == set(decode_bf16) == {"1", "2", "4", "8", "16", "64"}
    assert decode["64"] > decode["1"] > 1e8 and decode_bf16["64"] > decode_bf16["1"] > 1e8
    # the same on rank 0 alone: the device's solo speedup is their median ratio, never below 1
    solo = measured["decode_linear_flops_solo"]
    assert set(solo["float32"]) == set(solo["bfloat16"]) == set(decode) and min(solo["float32"].values()) > 1e8

    # rank 0 alone with a thread per core (the others waiting): one folded rank's device
    whole = measured["whole_machine"]
    assert whole["threads"] >= 1 and set(whole["matmul_flops"]) == {"float32", "bfloat16"}
    assert set(whole["decode_linear_flops"]["bfloat16"]) == set(decode) and whole["copy_bandwidth"] > 1e8
    folded = calibrate.whole_machine_cluster(2)
    assert folded.num_devices == 1 and folded.device.flops_for("bf16") == whole["matmul_flops"]["bfloat16"]
    assert folded.device.memory_bandwidth == whole["copy_bandwidth"] and folded.allreduce_latency == ()
    assert calibrate.whole_machine_cluster(1) is None

    # the cache is written once and re-used: the second call spawns nothing and returns the same figures
    with open(calibrate.calibration_path(2)) as f:
        assert json.load(f)["measured"] == measured
    start = time.perf_counter()
    cluster = parse_cluster("2xlocal")
    assert time.perf_counter() - start < 5
    assert cluster.num_devices == 2 and cluster.device.flops_for("bf16") == measured["matmul_flops"]["bfloat16"]
    assert cluster.allreduce_seconds(4 * 2 ** 20, 2) > cluster.allreduce_seconds(1024, 2) > 0
    assert cluster.allreduce_latency[0] == measured["tp_allreduce"]["2"]["latency"]
    assert cluster.device.layer_overhead == measured["layer_overhead"]
    assert cluster.device.decode_flops_for("float32", 16) == decode["16"]
    assert cluster.device.decode_flops_for("bf16", 16) == decode_bf16["16"]
    ratios = sorted(solo[d][r] / measured["decode_linear_flops"][d][r] for d in solo for r in solo[d])
    assert cluster.device.solo_speedup == max(1.0, (ratios[5] + ratios[6]) / 2)

    result = plan_layouts(ModelConfig.from_hf(SMOLLM2), cluster, parse_workload("sharegpt-small"))
    assert result.best.tokens_per_s > 0 and {c.prefill.degrees for c in result.ranked} == {(1, 2, 1), (2, 1, 1),
                                                                                         (1, 1, 2)}

    # launch/plan.py on this machine as 2 ranks also prints one rank on every core, as a job weighs it
    with open(tmp_path / "config.json", "w") as f:
        json.dump(SMOLLM2, f)
    proc = subprocess.run([sys.executable, PLAN, "--model", str(tmp_path / "config.json"), "--cluster", "2xlocal",
                           "--workload", "sharegpt-small"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SEESAW_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("one rank on every core (local (")]
    one = plan_layouts(ModelConfig.from_hf(SMOLLM2), folded, parse_workload("sharegpt-small")).best.tokens_per_s
    assert f"): {one:,.0f} tokens/s, {one / result.best.tokens_per_s:.2f}x the best 2-rank layout" in line, line
