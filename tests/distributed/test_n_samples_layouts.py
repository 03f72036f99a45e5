"""n samples sharing one prefill on real ranks: under TP2, PP2 and PP2xTP2 (the device pool) and PP2 -> TP2 (the prompt stashed
once in the host store, the samples forked in the decode stage), each sample equals an independent request
seeded with its derived seed, token for token, and its per-token logprobs equal a Hugging Face fp32 forward
of the whole sequence within 1e-5."""
import pytest
import torch

from seesaw_ds import SamplingParams
from tests.conftest import tiny_hf_model
from tests.distributed.harness import run_ranks
from tests.engine.test_n_samples import hf_token_logprobs

LENGTHS = [21, 16, 37, 5]
N, MAX_TOKENS = 4, 10


def _run(engine, prompts, params_of):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params_of(i))
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = o
    return [out[str(i)] for i in range(len(prompts))]


def _generate(rank, folder, parallel, prompts, kv_device_gb):
    from seesaw_ds.distributed.builder import build_engine
    from seesaw_ds.engine.config import EngineConfig
    engine = build_engine(EngineConfig(model=folder, dtype="float32", parallel=parallel, block_size=8,
                                       kv_host_gb=0.002, kv_device_gb=kv_device_gb, max_model_len=64))
    params = SamplingParams(n=N, temperature=1.0, seed=321, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    stats = engine.stats
    grouped = _run(engine, prompts, lambda i: params)
    peak_grouped, stats.device_blocks_peak = stats.device_blocks_peak, 0
    host_grouped, stats.host_occupancy = max(stats.host_occupancy, default=0.0), []
    singles = _run(engine, [p for p in prompts for _ in range(N)], lambda i: params.for_sample(i % N))
    result = {"grouped": [[(s.token_ids, s.token_logprobs) for s in o.samples] for o in grouped],
              "singles": [o.token_ids for o in singles], "peaks": [peak_grouped, stats.device_blocks_peak],
              "host_peaks": [host_grouped, max(stats.host_occupancy, default=0.0)],
              "host_tier": engine.scheduler.has_host_tier, "kv": engine.kv_metrics}
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.num_used == 0
    engine.close()
    return result


PAIR = {"prefill": {"pp": 2}, "decode": {"tp": 2}}
SMALL_POOL = 14 * 3072 / (1 << 30)      # 14 blocks of 8 tokens per TP2 rank (1 KV head of 16 dims, 3 layers)
CASES = {"tp2": ({"tp": 2}, 0.002, 2), "pp2-tp2": (PAIR, 0.002, 2),
         # samples outgrow the pool: swapped out to the host store (their shared blocks stay for siblings)
         "pp2-tp2-small-pool": (PAIR, SMALL_POOL, 2),
         # TP x PP: the last stage's TP ranks gather their vocabulary slices, rank 2 samples, all get the tokens
         "pp2xtp2": ({"tp": 2, "pp": 2}, 0.002, 4),
         # decode in flight across steps: rank 0 (stage 0) takes each micro-batch's tokens and logprobs from
         # the last stage's sends
         "pp2": ({"pp": 2}, 0.002, 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_n_samples_equal_independent_requests_and_logprobs_equal_a_full_forward(case, tmp_path):
    parallel, kv_device_gb, world = CASES[case]
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
    out = run_ranks(world, _generate, str(tmp_path / "model"), parallel, prompts, kv_device_gb,
                    out_dir=str(tmp_path))
    assert out["host_tier"] == ("prefill" in parallel)
    worst = 0.0
    for k, (prompt, samples) in enumerate(zip(prompts, out["grouped"])):
        for i, (tokens, logprobs) in enumerate(samples):
            assert tokens == out["singles"][k * N + i], (k, i)
            expected = hf_token_logprobs(model, prompt, tokens)
            worst = max(worst, (torch.tensor(logprobs) - expected).abs().max().item())
    assert worst <= 1e-5, worst
    if kv_device_gb == SMALL_POOL:
        assert out["kv"]["num_swap_outs"] > 0, out["kv"]
    else:                                   # the prompts' full blocks held once
        assert out["peaks"][0] < out["peaks"][1], out["peaks"]
        if out["host_tier"]:                # the host store held each prompt once, not N times
            assert 0 < out["host_peaks"][0] < out["host_peaks"][1], out["host_peaks"]
