import pytest

from seesaw_ds.models.config import ModelConfig


def _make_cfg(**overrides) -> ModelConfig:
    fields = dict(model_type="llama", num_layers=7, hidden_size=144, intermediate_size=200, num_heads=9,
                  num_kv_heads=3, head_dim=16, vocab_size=50, max_position=128, rope_theta=10000.0,
                  tie_embeddings=False, qkv_bias=False, sliding_window=None, rms_norm_eps=1e-6)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def make_cfg():
    return _make_cfg
