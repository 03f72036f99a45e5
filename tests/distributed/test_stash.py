"""The asynchronous stash writes the host store exactly as the synchronous path does, flush() waits for every
pending write, and a failed background write surfaces on flush(). No ranks needed: each store is a
HostKVStore over a temporary file."""
import threading
import time

import pytest
import torch
from transformers import DynamicCache

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.distributed.stash import KVStasher, StashError
from seesaw_ds.kv.attention import AttentionMetadata
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.models.runner import ModelRunner
from tests.conftest import tiny_hf_model

BLOCK = 8


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _store(cfg: ModelConfig, tmp_path, name: str, blocks: int = 40, dtype=torch.bfloat16) -> HostKVStore:
    return HostKVStore(cfg, blocks, BLOCK, dtype, str(tmp_path / name), create=True)


def _packed_prefill(lengths, host_blocks: int, seed: int):
    """Token ids, positions and host-store slots of a packed prefill whose sequences sit in scattered
    host blocks (a random permutation), like the scheduler hands out after a few cycles."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(host_blocks, generator=g).tolist()
    ids, pos, slots, cu, per_seq = [], [], [], [0], []
    for n in lengths:
        blocks = torch.tensor([free.pop() for _ in range(-(-n // BLOCK))])
        p = torch.arange(n)
        s = blocks[p // BLOCK] * BLOCK + p % BLOCK
        ids.append(torch.randint(2, 320, (n,), generator=g))
        pos.append(p)
        slots.append(s)
        per_seq.append((ids[-1], s))
        cu.append(cu[-1] + n)
    meta = AttentionMetadata(True, torch.cat(slots), cu, None, None)
    return torch.cat(ids), torch.cat(pos), meta, per_seq


def _prefill_into(runner: ModelRunner, kv, ids, pos, meta) -> None:
    runner.forward(ids, pos, meta, kv, torch.tensor(meta.cu_seqlens[1:]) - 1)


def test_async_stash_of_a_real_prefill_is_bit_identical_to_sync(tmp_path):
    model = tiny_hf_model("llama")
    cfg = ModelConfig.from_hf(model.config)
    runner = ModelRunner(model)
    ids, pos, meta, per_seq = _packed_prefill([5, 40, 17, 90, 1, 33], host_blocks=40, seed=1)

    sync_store, async_store = _store(cfg, tmp_path, "sync"), _store(cfg, tmp_path, "async")
    _prefill_into(runner, KVStasher(sync_store, range(sync_store.shape[2]), asynchronous=False), ids, pos, meta)
    stasher = KVStasher(async_store, range(async_store.shape[2]), asynchronous=True)
    _prefill_into(runner, stasher, ids, pos, meta)
    stasher.flush()
    assert torch.equal(async_store.tensor, sync_store.tensor)
    assert stasher.busy_s > 0

    # independent reference: Hugging Face's own cache, placed head-major at each sequence's slots
    ref = torch.zeros(sync_store.shape, dtype=torch.float32)
    for tokens, slots in per_seq:
        cache = DynamicCache()
        with torch.inference_mode():
            model(tokens[None, :], past_key_values=cache, use_cache=True)
        for layer in range(cfg.num_layers):
            k, v = cache.layers[layer].keys, cache.layers[layer].values        # [1, Hkv, n, D]
            ref[layer, 0][:, slots] = k[0]
            ref[layer, 1][:, slots] = v[0]
    torch.testing.assert_close(async_store.tensor.float(), ref, atol=2e-2, rtol=1e-2)   # bf16 store
    assert ref.abs().sum() > 0


def test_writes_for_a_head_range_land_in_those_heads_only(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama", num_key_value_heads=3, num_attention_heads=6).config)
    store = _store(cfg, tmp_path, "heads", dtype=torch.float32)
    stasher = KVStasher(store, range(1, 3))            # a tensor-parallel rank's heads
    g = torch.Generator().manual_seed(0)
    key = torch.randn(1, 2, 9, cfg.head_dim, generator=g)
    value = torch.randn(1, 2, 9, cfg.head_dim, generator=g)
    slots = torch.randperm(store.shape[3], generator=g)[:9]
    stasher.write(2, key.transpose(2, 3).contiguous().transpose(2, 3), value, slots)   # strided key
    stasher.flush()
    expected = torch.zeros(store.shape)
    expected[2, 0, 1:3][:, slots] = key[0]
    expected[2, 1, 1:3][:, slots] = value[0]
    assert torch.equal(store.tensor, expected)


class GatedStore(HostKVStore):
    """The real store whose writes wait until the test opens a gate: makes "still pending" deterministic."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def write(self, *args, **kwargs):
        self.gate.wait()
        super().write(*args, **kwargs)


def _random_writes(store: HostKVStore, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    _, _, hkv, tokens, d = store.shape
    for i in range(n):
        t = int(torch.randint(1, 20, (1,), generator=g))
        yield (i % store.shape[0], torch.randn(1, hkv, t, d, generator=g), torch.randn(1, hkv, t, d, generator=g),
               torch.randperm(tokens, generator=g)[:t])


def test_flush_waits_for_every_pending_write(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = GatedStore(cfg, 40, BLOCK, torch.float32, str(tmp_path / "gated"), create=True)
    expected = torch.zeros(store.shape)
    stasher = KVStasher(store, range(store.shape[2]), max_pending=64)
    writes = list(_random_writes(store, 30))
    for layer, k, v, slots in writes:
        stasher.write(layer, k, v, slots)              # returns at once: nothing has landed yet
        expected[layer, 0][:, slots] = k[0]
        expected[layer, 1][:, slots] = v[0]
    assert not store.tensor.any()
    opener = threading.Timer(0.3, store.gate.set)
    t0 = time.perf_counter()
    opener.start()
    stasher.flush()
    assert time.perf_counter() - t0 >= 0.25
    assert torch.equal(store.tensor, expected)
    assert stasher.wait_s >= 0.25
    stasher.close()


def test_a_full_queue_holds_the_writer_back(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = GatedStore(cfg, 40, BLOCK, torch.float32, str(tmp_path / "gated"), create=True)
    stasher = KVStasher(store, range(store.shape[2]), max_pending=2)
    writes = list(_random_writes(store, 4))
    threading.Timer(0.3, store.gate.set).start()
    t0 = time.perf_counter()
    for w in writes:                                   # 1 in the thread + 2 queued: the 4th must wait
        stasher.write(*w)
    assert time.perf_counter() - t0 >= 0.25
    stasher.close()


def test_background_error_surfaces_on_flush_then_the_stasher_recovers(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = _store(cfg, tmp_path, "err", dtype=torch.float32)
    stasher = KVStasher(store, range(store.shape[2]))
    (layer, k, v, slots), (layer2, k2, v2, slots2) = _random_writes(store, 2)
    stasher.write(layer, k, v, slots + store.shape[3])   # slots past the end of the store
    stasher.write(layer2, k2, v2, slots2)                # dropped: the step has failed already
    with pytest.raises(StashError) as info:
        stasher.flush()
    assert info.value.__cause__ is not None and "index" in str(info.value.__cause__).lower()
    assert not store.tensor.any()
    stasher.flush()                                      # reported once
    stasher.write(layer2, k2, v2, slots2)
    stasher.flush()
    assert torch.equal(store.tensor[layer2, 0][:, slots2], k2[0])
    stasher.close()


def test_sync_mode_raises_at_the_write_and_bad_shapes_are_refused(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = _store(cfg, tmp_path, "sync", dtype=torch.float32)
    ((layer, k, v, slots),) = _random_writes(store, 1)
    with pytest.raises((IndexError, RuntimeError)):
        KVStasher(store, range(store.shape[2]), asynchronous=False).write(layer, k, v, slots + store.shape[3])
    with pytest.raises(ValueError, match="slots"):
        KVStasher(store, range(store.shape[2])).write(layer, k, v, slots[:-1] if len(slots) > 1 else torch.cat([slots, slots]))
    with pytest.raises(ValueError, match="value"):
        KVStasher(store, range(store.shape[2])).write(layer, k, v[:, :, :0], slots)
    with pytest.raises(ValueError, match="max_pending"):
        KVStasher(store, range(store.shape[2]), max_pending=0)


@pytest.mark.parametrize("runs", [1, 3, 12])      # one run of slots, a few (slice copies), many (index_copy_)
def test_store_write_casts_and_places_rows_for_every_slot_pattern(runs, tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = _store(cfg, tmp_path, f"runs{runs}", blocks=40, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(runs)
    starts = torch.randperm(store.shape[3] // 4, generator=g)[:runs] * 4
    slots = torch.cat([torch.arange(s, s + 3) for s in starts.tolist()])                  # runs of 3 slots
    hkv, d = store.shape[2], store.shape[4]
    key = torch.randn(1, len(slots), hkv, d, generator=g).transpose(1, 2)                  # [1, Hkv, T, D] strided
    value = torch.randn(1, len(slots), hkv, d, generator=g).transpose(1, 2)
    KVStasher(store, range(hkv), asynchronous=False).write(2, key, value, slots)          # fp32 into a bf16 store
    want = torch.zeros(store.shape, dtype=torch.bfloat16)
    want[2, 0][:, slots] = key[0].to(torch.bfloat16)
    want[2, 1][:, slots] = value[0].to(torch.bfloat16)
    assert torch.equal(store.tensor, want)


def test_sync_mode_refuses_bad_shapes_before_writing(tmp_path):
    cfg = ModelConfig.from_hf(tiny_hf_model("llama").config)
    store = _store(cfg, tmp_path, "syncshape", dtype=torch.float32)
    ((layer, k, v, slots),) = _random_writes(store, 1)
    sync = KVStasher(store, range(store.shape[2]), asynchronous=False)
    with pytest.raises(ValueError, match="value"):
        sync.write(layer, k, v[:, :, :0], slots)
    with pytest.raises(ValueError, match="slots"):
        sync.write(layer, k, v, torch.cat([slots, slots]))
    with pytest.raises(ValueError, match="KV heads"):
        sync.write(layer, k[:, :1], v[:, :1], slots)
    assert not store.tensor.any()
