"""evals/decode_profile.py's floors: the split TP really makes (its busiest rank per phase) against the even
split; equal where heads, MLP and vocabulary divide evenly, above it where KV heads do not."""
import pytest
import torch

from evals.decode_profile import floors, split_floors
from seesaw_ds.models.config import ModelConfig


def _cfg(kv_heads: int, heads: int) -> ModelConfig:
    return ModelConfig.from_hf({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64 * heads,
                                "intermediate_size": 1024, "num_attention_heads": heads,
                                "num_key_value_heads": kv_heads, "head_dim": 64, "vocab_size": 4096})


@pytest.mark.parametrize("tp", [1, 2])
def test_an_even_split_has_the_even_floor(tp):
    cfg, ctx = _cfg(4, 8), torch.full((8,), 100)
    even = floors(cfg, ctx, tp, 400.0, 10.0)
    # within the norms, which every TP rank holds whole (the even split divides them too)
    assert split_floors(cfg, ctx, tp, 400.0, 10.0)["step_ms"] == pytest.approx(
        cfg.num_layers * even["layer_ms"] + even["head_ms"], rel=1e-3 if tp > 1 else 1e-12)


def test_kv_heads_that_do_not_divide_cost_the_busiest_rank():
    cfg, ctx = _cfg(3, 9), torch.full((8,), 100)             # AutoTP: 6 query / 2 KV heads and 3 / 1
    split = split_floors(cfg, ctx, 2, 400.0, 10.0)
    h, d, b, kv_tokens = 576, 64, 8, 800
    params = h * d * (6 + 2 * 2) + 6 * d * h + h
    by_hand = 1e3 * ((2 * b * params + 4 * kv_tokens * 6 * d) / 400e9 + (2 * params + 4 * kv_tokens * 2 * d) / 10e9)
    assert split["attention_ms_per_rank"][0] == pytest.approx(by_hand, rel=1e-12)
    assert split["attention_ms_per_rank"][0] > 1.9 * split["attention_ms_per_rank"][1]
    even = floors(cfg, ctx, 2, 400.0, 10.0)
    assert split["step_ms"] > cfg.num_layers * even["layer_ms"] + even["head_ms"]
