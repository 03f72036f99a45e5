"""Two real ranks: DeepSpeed AutoTP's per-rank weights equal the plan's TP shards.

Forked (not spawned) workers reuse the parent's imports, so the run takes seconds once DeepSpeed's
shared-memory all-reduce op is built (its first build, on a fresh machine, takes about a minute).
"""
import glob
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from seesaw_ds.distributed.node import free_port
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import weight_plan
from tests.parallel.reference_copy import materialize_shard

WORLD = 2
HF_CONFIGS = {  # model_type -> config kwargs
    "llama": dict(num_hidden_layers=3, hidden_size=144, intermediate_size=200, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=16, vocab_size=50, tie_word_embeddings=True, attention_bias=True),
    "qwen2": dict(num_hidden_layers=2, hidden_size=100, intermediate_size=130, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=40, tie_word_embeddings=False),
}


def _build_models():
    from transformers import AutoConfig, AutoModelForCausalLM
    models = {}
    for i, (model_type, kwargs) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        models[model_type] = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    return models


def _worker(rank, port, models, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    for model_type, model in models.items():
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": WORLD}, dtype=torch.float32,
                                          replace_with_kernel_inject=False)
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        torch.save(params, os.path.join(out_dir, f"{model_type}-rank{rank}.pt"))


def test_autotp_rank_weights_equal_plan_shards(tmp_path):
    pytest.importorskip("deepspeed")
    torch.set_num_threads(1)
    models = _build_models()
    full = {t: {n: p.detach().clone() for n, p in m.state_dict().items()} for t, m in models.items()}
    port = free_port()
    try:
        context = mp.start_processes(_worker, args=(port, models, str(tmp_path)), nprocs=WORLD, join=False,
                                     start_method="fork")
        deadline = time.monotonic() + 600
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("AutoTP workers did not finish in 600 s")
    finally:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            os.remove(path)

    for model_type, model in models.items():
        cfg = ModelConfig.from_hf(model.config)
        plan = weight_plan(cfg, Layout(tp=WORLD))
        for rank in range(WORLD):
            actual = torch.load(tmp_path / f"{model_type}-rank{rank}.pt")
            expected = materialize_shard(plan.for_global_rank(rank), full[model_type])
            assert set(actual) == set(expected), (model_type, rank)
            for name, tensor in expected.items():
                assert torch.equal(actual[name], tensor), (model_type, rank, name)
