"""The start-up KV budget check over every rank, against the engine builder's own rule (check_kv_budget);
an architecture we do not run, named before transformers reads the config (the job's CLI line for it is in
tests/launch/test_bad_inputs.py)."""
import json
import re

import pytest

from seesaw_ds.jobs.startup_checks import kv_budget_problems
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import resolve_layouts

CFG = ModelConfig(model_type="llama", num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4,
                  num_kv_heads=2, head_dim=16, vocab_size=100, max_position=512, rope_theta=10000.0,
                  tie_embeddings=False, qkv_bias=False, sliding_window=None, rms_norm_eps=1e-6)
# one token: K and V, 4 layers, 2 KV heads, 16 dims, fp32 = 1024 bytes; 256 tokens = 256 KiB
ONE_ROW_GB = 256 * 1024 / (1 << 30)


def problems(layouts, device_gb, host_gb, single=False):
    import torch
    return kv_budget_problems(CFG, layouts, device_gb=device_gb, host_gb=host_gb, max_model_len=256,
                              block_size=16, dtype=torch.float32, single_process=single)


def test_one_process_needs_one_whole_row():
    assert problems(None, ONE_ROW_GB, 0.0, single=True) == []
    [(key, text)] = problems(None, ONE_ROW_GB * 0.99, 0.0, single=True)
    assert key == "engine.kv.device_gb" and "cannot hold one sequence of max_model_len=256" in text


@pytest.mark.parametrize("label", ["PP2->TP2"])
def test_several_ranks_check_the_host_store_and_each_ranks_share(label):
    layouts = resolve_layouts(label, 2, CFG)
    assert problems(layouts, ONE_ROW_GB / 2, ONE_ROW_GB) == []       # TP2 decode: half the heads per rank
    [(key, text)] = problems(layouts, ONE_ROW_GB / 2, ONE_ROW_GB * 0.9)
    assert key == "engine.kv.host_gb" and text.startswith("engine.kv.host_gb=") and "host store of 2 ranks" in text
    [(key, text)] = problems(layouts, ONE_ROW_GB / 2 * 0.9, ONE_ROW_GB)
    assert key == "engine.kv.device_gb" and "decode rank 0 of 2" in text


UNKNOWN = re.escape("unsupported architecture 'MambaLikeForCausalLM' (model_type 'mamba_like'); "
                    "supported model types: llama, mistral, qwen2")


def test_an_unknown_model_type_is_named_by_the_loader_and_by_llm(tmp_path):
    """transformers does not know this model_type either: its own error would say only "cannot load"."""
    from seesaw_ds import LLM
    from seesaw_ds.models.config import UnsupportedArchitecture
    from seesaw_ds.models.loader import load_model_config
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba_like",
                                                      "architectures": ["MambaLikeForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture, match=UNKNOWN):
        load_model_config(str(tmp_path))
    with pytest.raises(UnsupportedArchitecture, match=UNKNOWN):
        LLM(str(tmp_path), distributed=False)
