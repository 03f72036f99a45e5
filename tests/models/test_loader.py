import json

import pytest

from seesaw_ds.models.config import ModelConfig, UnsupportedArchitecture
from seesaw_ds.models.loader import load_model_config, resolve_model_folder
from tests.conftest import tiny_hf_model


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitecture, match="unsupported architecture 'GPT2LMHeadModel'.*llama"):
        load_model_config(str(tmp_path))


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        resolve_model_folder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        resolve_model_folder(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="unknown embedded model 'gpt5'"):
        resolve_model_folder("embedded:gpt5")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_model_config_normalises_each_family(kind):
    model = tiny_hf_model(kind)
    cfg = ModelConfig.from_hf(model.config)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 6, 2, 16)
    assert cfg.qkv_bias == (kind == "qwen2")
    n_params = sum(p.numel() for p in model.parameters())
    assert cfg.num_params == n_params


def test_folder_round_trip(tmp_path):
    from seesaw_ds import LLM
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "model")
    with LLM(str(tmp_path / "model"), dtype="bfloat16", cache_dir=str(tmp_path / "cache"), kv_device_gb=0.01) as llm:
        assert llm.config.model_type == "llama"
        assert str(llm.engine.weights.master["lm_head.weight"].dtype) == "torch.bfloat16"
        assert llm.tokenizer is None                 # weights-only folder: token ids still work
