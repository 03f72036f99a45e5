"""RolloutEngine on a pipeline-parallel DeepSpeed trainer (`pipeline_policy` -> PipelineModule, gloo CPU
ranks, tiny random Llama, fp32): the pipeline's loss equals the Hugging Face model's, its stages hold only
their own layers, and after one `train_batch` step the next rollout's greedy tokens equal Hugging Face
`generate` of the updated weights (reassembled from every stage), for PP2 trainers into per-rank, TP2 and
PP2 -> TP2 rollouts (tied and untied embeddings), and a one-stage custom PipelineModule with its own name
map; plus the pure bucket plan."""
import pytest

from seesaw_ds.rollout.pipeline_sync import plan_buckets
from tests.conftest import tiny_hf_model
from tests.distributed.harness import run_ranks
from tests.rollout.pipeline_rank import train_then_rollout

LENGTHS = [5, 23, 11]
PP2TP2 = {"prefill": {"pp": 2}, "decode": {"tp": 2}}


def _prompts(seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]


CASES = [   # (ranks, pipeline stages, tied embeddings, ZeRO stage, rollout layout, bucket bytes, custom module)
    (2, 2, True, 0, None, 64 << 20, False),
    (2, 2, False, 1, {"tp": 2}, 64 << 20, False),
    (2, 2, True, 0, PP2TP2, 20_000, False),
    (1, 1, False, 0, None, 30_000, True),
]


@pytest.mark.parametrize("world,stages,tied,zero,parallel,bucket_bytes,custom", CASES,
                         ids=["pp2-tied-per-rank", "pp2-zero1-tp2", "pp2-tied-pp2tp2", "pp1-custom-map"])
def test_rollout_after_a_pipeline_step_equals_hf_generate(tmp_path, world, stages, tied, zero, parallel,
                                                          bucket_bytes, custom):
    folder = None
    if parallel is not None:
        folder = str(tmp_path / "model")
        tiny_hf_model("llama", seed=0, tie_word_embeddings=tied).save_pretrained(folder)
    prompts = _prompts(seed=world + stages + int(tied))
    out = run_ranks(world, train_then_rollout, stages, tied, zero, parallel, folder, prompts, bucket_bytes,
                    custom, out_dir=str(tmp_path))
    assert out["mapped_ok"]                              # the name map reassembles the HF state exactly
    assert abs(out["loss"] - out["hf_loss"]) < 1e-5, (out["loss"], out["hf_loss"])
    assert out["before"] == out["expect_before"]
    assert out["after"] == out["expect_after"]
    assert out["master_ok"]                              # the rollout's master copy equals the trainer's stages
    assert out["after"] != out["before"]                 # the step changed the weights and the rollout saw it
    names = [set(n) for n in out["names"]]
    if stages == 2:                                      # each stage holds only its own layers
        assert "model.layers.0.self_attn.q_proj.weight" in names[0] - names[1]
        assert "model.norm.weight" in names[1] - names[0]
        assert ("model.embed_tokens.weight" in names[0] & names[1]) == tied   # the tied copy on both ends
    if custom:
        assert "name map" in out["refused"]              # a custom module without name_map= is refused
    assert out["num_params"] == 3 * 9 + 2 + int(not tied)
    if bucket_bytes < 100_000:
        assert out["buckets"] > 3


def test_bucket_plan_owners_writers_and_sizes():
    f32 = "float32"
    manifests = [[("a", (10,), f32), ("emb", (100,), f32), ("b", (30,), f32)],      # rank 0: stage 0
                 [("c", (50,), f32), ("emb", (100,), f32)],                         # rank 1: stage 1 (tied emb)
                 [("a", (10,), f32), ("emb", (100,), f32), ("b", (30,), f32)]]      # rank 2: stage 0, dp 1
    plan = plan_buckets(manifests, [True, False, False], bucket_bytes=400)
    assert [(b.owner, [s.name for s in b.slots]) for b in plan] == [(0, ["a"]), (0, ["emb"]), (0, ["b"]),
                                                                     (1, ["c"])]
    assert [b.moves for b in plan] == [False, False, False, True]   # only rank 1's bytes cross to the writer
    assert all(b.nbytes <= 400 or len(b.slots) == 1 for b in plan)
    plan = plan_buckets(manifests, [True, True, True], bucket_bytes=1 << 20)
    assert [(b.owner, b.moves, [(s.name, s.offset) for s in b.slots]) for b in plan] == [
        (0, True, [("a", 0), ("emb", 40), ("b", 440)]), (1, True, [("c", 0)])]
