"""The engine's lifecycle on real models: new weights between generate calls (a trainer's state_dict) give
Hugging Face `generate`'s tokens of the new model, in one process and under PP2 -> TP2; a checkpoint
overwritten in place is never served from the old master copy; abort frees a request's blocks; close()
joins threads, releases the process group it made, and is idempotent."""
import threading

import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model
from tests.distributed.harness import run_ranks

LENGTHS = [5, 40, 17, 90, 3, 60]
MAX_TOKENS = 8


def _prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in lengths]


def _greedy(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


def _expect(model, prompts):
    return [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


def test_update_weights_in_one_process_from_a_folder(tmp_path):
    old, new = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1)
    old.save_pretrained(tmp_path / "model")
    prompts = _prompts()
    with LLM(str(tmp_path / "model"), dtype="float32", cache_dir=str(tmp_path / "cache"),
             kv_device_gb=0.01) as llm:
        assert _greedy(llm, prompts) == _expect(old, prompts)
        cached = dict(llm.engine.weights.master.tensors)
        key = llm.engine.weights.content_key
        written = llm.update_weights(new.state_dict())              # a trainer's state_dict, fp32
        assert written > 0 and llm.engine.weights.content_key != key
        assert _greedy(llm, prompts) == _expect(new, prompts)
        # the cached master copy of the checkpoint is untouched: a new engine still serves the old weights
        for name, t in cached.items():
            assert torch.equal(t, old.state_dict()[name]), name
        llm.update_weights(old.named_parameters())                  # (name, tensor) pairs: back again
        assert _greedy(llm, prompts) == _expect(old, prompts)
        assert llm.metrics()["weight_updates"] == 2


def test_update_weights_of_an_in_memory_model():
    old, new = tiny_hf_model("qwen2", seed=0), tiny_hf_model("qwen2", seed=1)
    llm = LLM.from_hf(tiny_hf_model("qwen2", seed=0), kv_device_gb=0.01)
    prompts = _prompts(seed=1)
    assert _greedy(llm, prompts) == _expect(old, prompts)
    llm.update_weights(new.state_dict())
    assert _greedy(llm, prompts) == _expect(new, prompts)
    with pytest.raises(ValueError, match="no_such.weight"):
        llm.update_weights({"no_such.weight": torch.zeros(1)})
    llm.close()


def test_a_checkpoint_overwritten_in_place_is_not_served_from_the_old_master(tmp_path):
    folder, cache = str(tmp_path / "model"), str(tmp_path / "cache")
    old, new = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=2)
    prompts = _prompts(seed=2)
    old.save_pretrained(folder)
    with LLM(folder, dtype="float32", cache_dir=cache, kv_device_gb=0.01) as llm:
        assert _greedy(llm, prompts) == _expect(old, prompts)
    new.save_pretrained(folder)                                      # same folder, new weights
    with LLM(folder, dtype="float32", cache_dir=cache, kv_device_gb=0.01) as llm:
        assert _greedy(llm, prompts) == _expect(new, prompts)


def test_abort_frees_blocks_and_the_rest_finish_exactly():
    model = tiny_hf_model("llama")
    llm = LLM.from_hf(tiny_hf_model("llama"), kv_device_gb=0.01)
    engine, prompts = llm.engine, _prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    assert engine.abort("1").finish_reason == "abort"               # still waiting
    engine.step()                                                    # prefill
    engine.step()                                                    # one decode step
    partial = engine.abort("3")                                      # running: its blocks go back now
    assert partial.finish_reason == "abort" and len(partial.token_ids) == 2
    assert engine.abort("3") is None and engine.abort("unknown") is None
    out = {}
    while engine.has_unfinished():
        out |= {o.request_id: o.token_ids for o in engine.step()}
    assert sorted(out) == ["0", "2", "4", "5"]
    for i in out:
        assert out[i] == hf_greedy(model, prompts[int(i)], MAX_TOKENS)
    engine.scheduler.allocator.check_integrity()
    assert engine.scheduler.allocator.num_used == 0
    with engine:                     # the engine is its own context manager too
        pass
    assert engine.closed
    llm.close()


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(("seesaw-prefetch", "seesaw-stash"))}


def _pp2_tp2(rank, folder, prompts, new_state):
    import torch.distributed as dist
    llm = LLM(folder, dtype="float32", parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}},
              kv_device_gb=0.01, kv_host_gb=0.01, block_size=8, max_model_len=256)
    before = _greedy(llm, prompts)
    llm.update_weights(new_state if rank == 0 else None)          # rank 0's weights are written
    after = _greedy(llm, prompts)
    switches = llm.metrics()["num_switches"]
    with llm:
        pass                                                       # __exit__ closes; close() again is a no-op
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.engine.step()
    return {"before": before, "after": after, "switches": switches, "threads": sorted(_threads()),
            "group_left": dist.is_initialized()}


def test_update_weights_under_pp2_to_tp2_and_close(tmp_path):
    old, new = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=3)
    old.save_pretrained(tmp_path / "model")
    prompts = _prompts(seed=3)
    state = {k: v.clone() for k, v in new.state_dict().items()}
    out = run_ranks(2, _pp2_tp2, str(tmp_path / "model"), prompts, state, out_dir=str(tmp_path))
    assert out["before"] == _expect(old, prompts)
    assert out["after"] == _expect(new, prompts)
    assert out["switches"] >= 2 and out["threads"] == []
    assert out["group_left"] is False          # the LLM made the process group, so close() removed it


def test_update_weights_in_bf16_reach_the_packed_decode_linears():
    """bf16 decode runs packed copies of the linears (models/packed_linear.py): after an update the
    engine generates what a fresh engine on the new weights generates."""
    new = tiny_hf_model("qwen2", seed=1).to(torch.bfloat16)
    llm = LLM.from_hf(tiny_hf_model("qwen2", seed=0).to(torch.bfloat16), kv_device_gb=0.01)
    prompts = _prompts(seed=4)
    before = _greedy(llm, prompts)
    llm.update_weights(new.state_dict())
    with LLM.from_hf(new, kv_device_gb=0.01) as fresh:
        want = _greedy(fresh, prompts)
    assert _greedy(llm, prompts) == want and want != before
    llm.close()


def _pp2_tp2_bf16(rank, folder, prompts, new_state):
    with LLM(folder, dtype="bfloat16", parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}}, kv_device_gb=0.01,
             kv_host_gb=0.01, block_size=8, max_model_len=256) as llm:
        before = _greedy(llm, prompts)
        if new_state is not None:
            llm.update_weights(new_state if rank == 0 else None)      # rank 1 sees it through the master's key
        return {"before": before, "after": _greedy(llm, prompts)}


def test_update_weights_in_bf16_under_pp2_to_tp2(tmp_path):
    old, new = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=3)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    state = {k: v.clone() for k, v in new.state_dict().items()}
    prompts = _prompts(seed=5)
    updated = run_ranks(2, _pp2_tp2_bf16, str(tmp_path / "old"), prompts, state, out_dir=str(tmp_path))
    fresh = run_ranks(2, _pp2_tp2_bf16, str(tmp_path / "new"), prompts, None, out_dir=str(tmp_path))
    assert updated["after"] == fresh["after"] and updated["after"] != updated["before"]
