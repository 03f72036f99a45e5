"""The vocabulary-parallel head's exchanges on real gloo ranks: greedy tokens and gathered logits equal
what one process computes from the whole [B, V] logits, ties across slices included."""
from __future__ import annotations

import pytest
import torch

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.models.vocab_head import ShardedLogits, VocabShard
from seesaw_ds.parallel.weight_plan import vocab_head_entry, vocab_rows
from tests.distributed.harness import run_ranks


def _logits(batch: int, vocab: int) -> torch.Tensor:
    """[B, V] with planted cases: a tie across the slice boundary, a row whose maximum is in the last
    slice, a row of one repeated value, a row with -inf everywhere but one id."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, vocab, generator=g)
    x[0, 3] = x[0, vocab - 2] = 50.0                 # tie: the lowest id wins
    x[1, vocab - 1] = 60.0                           # the maximum in the last slice
    x[2] = 1.5                                       # all equal: id 0
    x[3] = float("-inf")
    x[3, vocab // 2] = 0.0
    return x


def _exchange(rank: int, world: int, vocab: int) -> dict:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    logits = _logits(6, vocab)
    rows = vocab_rows(_cfg(vocab), world)[rank]
    shard = VocabShard(rows.start, rows.stop, vocab, rank, world, lambda t: dist.all_reduce(t))
    sharded = ShardedLogits(logits[:, rows.start:rows.stop].clone(), shard)
    picked = sharded.rows(torch.tensor([5, 0, 1, 2, 3, 4]))
    return {"argmax": sharded.argmax().tolist(), "reference": logits.argmax(-1).tolist(),
            "picked": picked.argmax().tolist(), "picked_reference": logits[[5, 0, 1, 2, 3, 4]].argmax(-1).tolist(),
            "full_equal": bool(torch.equal(sharded.full(), logits)), "rows": [rows.start, rows.stop]}


def _cfg(vocab: int) -> ModelConfig:
    return ModelConfig(model_type="llama", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                       num_kv_heads=2, head_dim=16, vocab_size=vocab, max_position=128, rope_theta=10000.0,
                       tie_embeddings=True, qkv_bias=False, sliding_window=None, rms_norm_eps=1e-6)


@pytest.mark.parametrize("vocab", [1024, 1000])          # even slices; a tail on the last rank
def test_greedy_and_gathered_logits_match_one_process(vocab, tmp_path):
    got = run_ranks(2, _exchange, 2, vocab, out_dir=str(tmp_path))
    assert got["argmax"] == got["reference"]
    assert got["argmax"][:4] == [3, vocab - 1, 0, vocab // 2]
    assert got["picked"] == got["picked_reference"]
    assert got["full_equal"]


def test_vocab_rows_cover_the_vocabulary_once():
    for vocab, tp in [(49152, 2), (1000, 3), (32000, 4), (50, 2)]:
        rows = vocab_rows(_cfg(vocab), tp)
        assert [r.start for r in rows[1:]] == [r.stop for r in rows[:-1]]
        assert rows[0].start == 0 and rows[-1].stop == vocab
        entry = vocab_head_entry(_cfg(vocab), tp, tp - 1)
        assert entry.source_name == "model.embed_tokens.weight" and not entry.primary
        assert entry.source_ranges == ((rows[-1].start, rows[-1].stop), (0, 64))


def test_a_slice_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="not a slice of the vocabulary"):
        VocabShard(0, 70, 64, 0, 2, lambda t: None)
