"""One rank of a pipeline-parallel trainer + rollout run (see test_pipeline_trainer.py): train a step with
`train_batch`, sync into the rollout, return its greedy tokens and rank 0's Hugging Face references."""
import torch
from torch import nn

from seesaw_ds import SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model

MAX_TOKENS = 6


def greedy(rollout, prompts):
    outs = rollout.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return [o.samples[0].token_ids for o in outs]


def full_state(pipe, name_map):
    """Every stage's parameters under Hugging Face names, gathered from all ranks (collective)."""
    import torch.distributed as dist
    local = {name_map(n): p.detach().clone() for n, p in pipe.named_parameters()}
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, local)
    merged = {}
    for part in box:
        merged.update(part)
    return merged, sorted(local)


def reference(state, tied, prompts):
    model = tiny_hf_model("llama", seed=0, tie_word_embeddings=tied)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    return [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


class NormAndHead(nn.Module):
    """A custom last layer (final norm + untied head under other attribute names), for the name_map case."""

    def __init__(self, source):
        super().__init__()
        self.final_norm, self.out = source.model.model.norm, source.model.lm_head

    def forward(self, inputs):
        return self.out(self.final_norm(inputs[0]))


def custom_pipe(model):
    """A user's own PipelineModule (no `hf_name_map`): embedding, decoders, NormAndHead; and its name map."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    from seesaw_ds.rollout.pipeline_policy import PipeDecoderLayer, PipeEmbedding, _Source, next_token_loss
    L = model.config.num_hidden_layers
    source = _Source(model)
    specs = [LayerSpec(PipeEmbedding, source)] + [LayerSpec(PipeDecoderLayer, source, i) for i in range(L)]
    pipe = PipelineModule(layers=specs + [LayerSpec(NormAndHead, source)], num_stages=1,
                          loss_fn=next_token_loss, partition_method="type:PipeDecoderLayer", dynamic_shape=True)
    pipe.config = model.config                       # a per-rank rollout builds its model from it
    names = {"0.embed_tokens.weight": "model.embed_tokens.weight", f"{L + 1}.final_norm.weight": "model.norm.weight",
             f"{L + 1}.out.weight": "lm_head.weight"}

    def name_map(name):
        if name in names:
            return names[name]
        index, local = name.split(".", 1)
        return f"model.layers.{int(index) - 1}.{local.split('.', 1)[1]}"
    return pipe, name_map


def train_then_rollout(rank, num_stages, tied, zero, parallel, folder, prompts, bucket_bytes, custom):
    import deepspeed
    import torch.distributed as dist

    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.rollout import RolloutEngine, pipeline_policy
    from seesaw_ds.rollout.sync import strip_wrapper_prefix
    init_distributed()
    world = dist.get_world_size()
    model = tiny_hf_model("llama", seed=0, tie_word_embeddings=tied)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(2, 320, (2, 12), generator=g) for _ in range(2)]      # same on every rank
    with torch.no_grad():
        hf_loss = sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)
    if custom:
        pipe, name_map = custom_pipe(model)
    else:
        pipe, name_map = pipeline_policy(model, num_stages), strip_wrapper_prefix
    del model                                              # the stage keeps only its own layers
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": len(batches),
              "train_batch_size": 2 * len(batches) * (world // num_stages), "steps_per_print": 1 << 30,
              "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.AdamW(pipe.parameters(), lr=2e-2),
                                      config=config)
    rollout = RolloutEngine(engine, None, parallel=parallel, model=folder, dtype="float32", kv_device_gb=0.02,
                            kv_host_gb=0.02, block_size=8, max_model_len=256, bucket_bytes=bucket_bytes,
                            name_map=name_map)
    refused = None
    if custom:                                             # no name map: refused before any byte moves
        try:
            rollout.weight_sync.sync(engine.module)
        except ValueError as err:
            refused = str(err)
    mapped = name_map if custom else pipe.hf_name_map
    state, local_names = full_state(pipe, mapped)
    mapped_ok = sorted(state) == sorted(n for n in original if not (tied and n == "lm_head.weight")) and all(
        torch.equal(state[n], original[n]) for n in state)
    with rollout.generating():
        before = greedy(rollout, prompts)
    expect_before = reference(original, tied, prompts) if rank == 0 else None
    loss = float(engine.train_batch(iter([(b, b) for b in batches])))
    with rollout.generating():
        after = greedy(rollout, prompts)
    report = rollout.weight_sync.history[-1]
    state, _ = full_state(pipe, mapped)
    master = rollout.engine.weights.master                 # the writer's copy: every stage's bytes, exactly
    master_ok = all(torch.equal(master[n], state[n]) for n in state) if rank == 0 else None
    expect_after = reference(state, tied, prompts) if rank == 0 else None
    rollout.close()
    names = [None] * world
    dist.all_gather_object(names, local_names)
    return {"before": before, "after": after, "expect_before": expect_before, "expect_after": expect_after,
            "loss": loss, "hf_loss": hf_loss, "mapped_ok": mapped_ok, "master_ok": master_ok, "names": names,
            "refused": refused,
            "buckets": report.buckets, "sync_bytes": report.nbytes, "num_params": report.num_params}
