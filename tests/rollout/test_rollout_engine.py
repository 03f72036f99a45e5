"""RolloutEngine on a live DeepSpeed training engine (gloo CPU ranks, tiny random Llama, fp32): after an
optimizer step changes the weights, the next rollout's greedy tokens equal Hugging Face `generate` of the
updated model, for ZeRO-0 and ZeRO-3 trainers, one rank and two (TP2, PP2 -> TP2 rollouts); outside
`generating()` the KV pool and host store hold no memory (RSS measured); a sync that fails part-way keeps
the previous weights; every rank's samples carry their text, each decoded once per rank."""
import pytest
import torch

from seesaw_ds import SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model
from tests.distributed.harness import run_ranks

MAX_TOKENS = 6
LENGTHS = [5, 23, 11]


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]


def _greedy(rollout, prompts, seen=None):
    outs = rollout.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0))
    if seen is not None:
        seen.extend((s.token_ids, s.text) for o in outs for s in o.samples)
    return [o.samples[0].token_ids for o in outs]


def _counting_tokenizer():
    """A real fast tokenizer over the tiny model's 320 ids (id i is the text `<i>`, none special) that counts
    its decode calls."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    class CountingTokenizer(PreTrainedTokenizerFast):
        decodes = 0

        def decode(self, *args, **kwargs):
            self.decodes += 1
            return super().decode(*args, **kwargs)

    core = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(320)}, unk_token="<0>"))
    core.decoder = decoders.Fuse()
    return CountingTokenizer(tokenizer_object=core)


def _full_state(module):
    """The trainer's current weights as whole tensors (gathered under ZeRO-3)."""
    import deepspeed
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _reference(state, prompts):
    model = tiny_hf_model("llama", seed=0)
    model.load_state_dict(state, strict=False)
    return [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


def _train_then_rollout(rank, stage, parallel, folder, prompts, bucket_bytes):
    import deepspeed

    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.rollout import RolloutEngine
    init_distributed()
    world = torch.distributed.get_world_size()
    model = tiny_hf_model("llama", seed=0)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=2e-2),
                                      config=config)
    tokenizer = _counting_tokenizer()
    rollout = RolloutEngine(engine, tokenizer, parallel=parallel, model=folder, dtype="float32",
                            kv_device_gb=0.02, kv_host_gb=0.02, block_size=8, max_model_len=256,
                            bucket_bytes=bucket_bytes)
    pool_bytes = rollout.kv.pool.spec.num_blocks * rollout.kv.pool.spec.bytes_per_block
    store_bytes = rollout.kv.store.nbytes if rollout.kv.store is not None else 0
    seen = []                                            # (token ids, text) of every sample on this rank
    with rollout.generating():
        before = _greedy(rollout, prompts, seen)
        held = rollout.kv.pool_bytes
    state = _full_state(engine.module)                   # collective under ZeRO-3: every rank
    expect_before = _reference(state, prompts) if rank == 0 else None
    ids = torch.randint(2, 320, (2, 12), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    with rollout.generating():
        after = _greedy(rollout, prompts, seen)
        [last] = rollout.generate([prompts[0]], SamplingParams(max_tokens=3, logprobs=0))[0].samples
        logprobs = last.logprobs
        seen.append((last.token_ids, last.text))
    memory, report = rollout.memory, rollout.weight_sync.history[-1]
    state = _full_state(engine.module)
    expect_after = _reference(state, prompts) if rank == 0 else None
    released = rollout.kv.pool_bytes
    rollout.close()
    texts = [None] * world
    torch.distributed.all_gather_object(texts, (seen, tokenizer.decodes))
    return {"texts": texts, "before": before, "after": after, "expect_before": expect_before,
            "expect_after": expect_after, "held": held, "released": released, "pool_bytes": pool_bytes,
            "store_bytes": store_bytes, "memory": memory, "sync_bytes": report.nbytes, "buckets": report.buckets,
            "logprobs": logprobs}


CASES = [   # (ranks, ZeRO stage, rollout layout, bucket bytes)
    (1, 0, None, 64 << 20),
    (1, 3, None, 100_000),
    (2, 0, {"tp": 2}, 64 << 20),
    (2, 3, {"prefill": {"pp": 2}, "decode": {"tp": 2}}, 100_000),
]


@pytest.mark.parametrize("world,stage,parallel,bucket_bytes", CASES,
                         ids=["1rank-zero0", "1rank-zero3", "tp2-zero0", "pp2tp2-zero3"])
def test_rollout_after_an_optimizer_step_equals_hf_generate(tmp_path, world, stage, parallel, bucket_bytes):
    folder = None
    if parallel is not None:
        folder = str(tmp_path / "model")
        tiny_hf_model("llama", seed=0).save_pretrained(folder)
    prompts = _prompts(seed=world + stage)
    out = run_ranks(world, _train_then_rollout, stage, parallel, folder, prompts, bucket_bytes,
                    out_dir=str(tmp_path))
    assert out["before"] == out["expect_before"]
    assert out["after"] == out["expect_after"]
    assert out["after"] != out["before"]                 # the step changed the weights and the rollout saw it
    assert len(out["logprobs"]) == 3 and all(lp <= 0 for lp in out["logprobs"])
    for seen, decodes in out["texts"]:                   # every rank: every sample's text, decoded once
        assert seen == out["texts"][0][0]
        assert all(text == "".join(f"<{t}>" for t in ids) for ids, text in seen)
        assert decodes == len(seen) == 2 * len(prompts) + 1
    if stage == 3:
        assert out["buckets"] > 3                       # gathered bucket by bucket, not whole
    # memory: the pool is allocated only inside generating(), and its pages go back to the OS on exit
    assert out["held"] == out["pool_bytes"] and out["released"] == 0
    kv_bytes = out["pool_bytes"] + out["store_bytes"]
    mem = out["memory"]
    assert mem["inside"] - mem["after"] >= 0.8 * kv_bytes, (mem, kv_bytes)


def test_a_sync_that_fails_part_way_keeps_the_previous_weights(monkeypatch):
    from seesaw_ds.rollout import RolloutEngine, sync
    trainer = tiny_hf_model("llama", seed=0)
    prompts = _prompts(seed=7)
    rollout = RolloutEngine(trainer, None, kv_device_gb=0.01, block_size=8, max_model_len=256,
                            bucket_bytes=50_000)
    with rollout.generating():
        old = _greedy(rollout, prompts)
    assert old == [hf_greedy(trainer, p, MAX_TOKENS) for p in prompts]
    original = [p.detach().clone() for p in trainer.parameters()]
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    real_buckets = sync.buckets

    def failing(named, bucket_bytes):
        for i, group in enumerate(real_buckets(named, bucket_bytes)):
            if i == 3:
                raise RuntimeError("link lost")
            yield group

    monkeypatch.setattr(sync, "buckets", failing)
    with pytest.raises(RuntimeError, match="link lost"):
        with rollout.generating():
            pass
    monkeypatch.undo()
    with rollout.generating(sync=False):                 # the previous weights, not a mix
        assert _greedy(rollout, prompts) == old
    with rollout.generating():                           # a good sync serves the new weights
        assert _greedy(rollout, prompts) == [hf_greedy(trainer, p, MAX_TOKENS) for p in prompts]
        sampled = rollout.generate(prompts[:2], SamplingParams(temperature=1.0, max_tokens=5, seed=3,
                                                               logprobs=0, ignore_eos=True), n=3)
    # n samples per prompt, each with its own seed; their logprobs are the trainer's own forward (fp32)
    from seesaw_ds.rollout.grpo import build_batch, token_logprobs
    rows = [(o.prompt_token_ids, s) for o in sampled for s in o.samples]
    assert [len(o.samples) for o in sampled] == [3, 3] and len({s.seed for _, s in rows}) == 3
    batch = build_batch([p for p, _ in rows], [s.token_ids for _, s in rows], [s.logprobs for _, s in rows],
                        [0.0] * len(rows), pad_id=0)
    with torch.no_grad():
        trainer_lp = token_logprobs(trainer, batch.input_ids, batch.attention_mask)
    gap = ((trainer_lp - batch.old_logprobs).abs() * batch.target_mask).max()
    assert gap < 1e-5, gap
    with torch.no_grad():
        for p, o in zip(trainer.parameters(), original):
            p.copy_(o)
    rollout.close()
