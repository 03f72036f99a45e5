"""The CPU attention kernels (paged decode, bf16 prefill) against reference attention in fp32."""
import pytest
import torch
import torch.nn.functional as F

from seesaw_ds.kv.native import paged_decode_op


@pytest.fixture(scope="module")
def op():
    op = paged_decode_op()
    if op is None:
        pytest.skip("the native kernel cannot be built on this machine")
    return op


def reference(q, k_cache, v_cache, tables, lens, scale, window):
    # q: [B, H, D]; caches: [N, bs, Hkv, D] -> [B, H, D] in fp32
    B, H, D = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(B, H, D)
    for b in range(B):
        n = int(lens[b])
        start = max(0, n - window) if window else 0
        pos = torch.arange(start, n)
        slots = tables[b][pos // bs] * bs + pos % bs
        k = k_cache.reshape(-1, hkv, D)[slots].float().transpose(0, 1)      # [Hkv, T, D]
        v = v_cache.reshape(-1, hkv, D)[slots].float().transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=scale,
                                                enable_gqa=True)[:, 0]
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
# (20, 20, 64): two KV-head ranges per sequence on the tile path; (32, 1, 64): more query heads than a tile holds
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (7, 7, 64), (4, 1, 32), (6, 2, 80),
                                                     (20, 20, 64), (32, 1, 64)])
@pytest.mark.parametrize("window", [0, 5])
def test_matches_reference(op, dtype, tol, heads, kv_heads, head_dim, window):
    g = torch.Generator().manual_seed(heads * 100 + head_dim + window)
    B, bs, max_blocks = 6, 16, 9
    num_blocks = B * max_blocks + 3
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    lens = torch.tensor([1, 15, 16, 17, 70, max_blocks * bs])            # block edges and a full table
    q = torch.randn(B, heads, head_dim, generator=g).to(dtype)
    out = op(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, window),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("window", [0, 21])
def test_bf16_other_block_sizes(op, block_size, window):
    # 32: two 16-token tile chunks per block; 8: blocks smaller than a tile chunk (the vector path)
    g = torch.Generator().manual_seed(block_size + window)
    B, max_blocks = 4, 160 // block_size
    num_blocks = B * max_blocks + 2
    k_cache = torch.randn(num_blocks, block_size, 3, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, 3, 64, generator=g).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    lens = torch.tensor([1, 31, 33, 160])
    q = torch.randn(B, 9, 64, generator=g).to(torch.bfloat16)
    out = op(q, k_cache, v_cache, tables, lens, 0.125, window)
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, tables, lens, 0.125, window),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch", [0, 1, 2, 5])
def test_thread_ranges_cover_every_sequence_once(op, batch):
    # each thread takes a range of sequences balanced by their tokens: any batch, any thread count, same bits
    g = torch.Generator().manual_seed(batch)
    max_blocks = 8
    num_blocks = max(batch, 1) * max_blocks
    k_cache = torch.randn(num_blocks, 16, 3, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, 16, 3, 64, generator=g).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=g)[:batch * max_blocks].view(batch, max_blocks)
    lens = torch.tensor([128, 3, 90, 1, 40][:batch], dtype=torch.long)      # one long context, then short ones
    q = torch.randn(batch, 9, 64, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(op(q, k_cache, v_cache, tables, lens, 0.125, 0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    if batch:
        torch.testing.assert_close(outs[0].float(), reference(q, k_cache, v_cache, tables, lens, 0.125, 0),
                                   atol=2e-2, rtol=2e-2)


def test_only_table_blocks_are_read(op):
    # blocks outside every table hold NaN: any read of them would poison the output
    k_cache = torch.full((8, 4, 1, 64), float("nan"))
    v_cache = torch.full((8, 4, 1, 64), float("nan"))
    k_cache[[2, 5]] = torch.randn(2, 4, 1, 64)
    v_cache[[2, 5]] = torch.randn(2, 4, 1, 64)
    out = op(torch.randn(1, 2, 64), k_cache, v_cache, torch.tensor([[5, 2, 0]]), torch.tensor([7]), 0.125, 0)
    assert torch.isfinite(out).all()


def test_bad_shapes_are_refused(op):
    k = torch.zeros(4, 16, 2, 64)
    with pytest.raises(RuntimeError, match="not a multiple of KV heads"):
        op(torch.zeros(1, 3, 64), k, k, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0, 0)
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        op(torch.zeros(1, 4, 64), k, k, torch.zeros(1, 2, dtype=torch.long), torch.tensor([33]), 1.0, 0)


# ---- the bf16 prefill kernel ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefill_op():
    from seesaw_ds.kv.native import prefill_attention_op
    op = prefill_attention_op()
    if op is None:
        pytest.skip("the bf16 prefill kernel needs AVX512-BF16")
    return op


def _cpu_has_amx():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags


@pytest.fixture(params=[True, False], ids=["amx", "avx512"])
def prefill_path(request, prefill_op):
    # both paths of the op in one run: the tile unit (AMX) where usable, and the AVX512-BF16 one
    from seesaw_ds.kv.native import set_prefill_amx
    if set_prefill_amx(request.param) != request.param:
        set_prefill_amx(True)
        pytest.skip("the tile unit (AMX) is not usable here")
    yield prefill_op
    set_prefill_amx(True)


def test_prefill_takes_the_tile_unit_where_there_is_one(prefill_op):
    from seesaw_ds.kv.native import set_prefill_amx
    if not _cpu_has_amx():
        pytest.skip("no AMX on this CPU")
    assert set_prefill_amx(True)                  # (a kernel that refuses the tile state would fail here)


# lengths 1, 15, 17, ...: tiles of 16 (AMX) / 4 (AVX512) query rows and 32-key P V steps cut mid-way;
# group sizes 1, 3, 4 at head_dim 64 and 128
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths", [
    (9, 3, 64, [1536]), (9, 3, 64, [1, 2, 15, 16, 17, 33, 300]), (8, 2, 128, [700, 33]), (4, 4, 64, [63, 1]),
    (12, 3, 128, [1, 15, 17, 64, 129]), (6, 6, 128, [1, 15, 17, 200]), (8, 2, 64, [1, 17, 95, 31, 32])])
def test_prefill_matches_fp32_causal_attention(prefill_path, heads, kv_heads, head_dim, lengths):
    prefill_op = prefill_path
    g = torch.Generator().manual_seed(sum(lengths))
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    # strided like transformers' [1, H, T, D] views of [1, T, H, D] projections
    q = torch.randn(1, T, heads, head_dim, generator=g).to(torch.bfloat16).transpose(1, 2)[0]
    k = torch.randn(1, T, kv_heads, head_dim, generator=g).to(torch.bfloat16).transpose(1, 2)[0]
    v = torch.randn(1, T, kv_heads, head_dim, generator=g).to(torch.bfloat16).transpose(1, 2)[0]
    out = prefill_op(q, k, v, cu, head_dim ** -0.5)                              # [T, H, D]
    ref = torch.cat([F.scaled_dot_product_attention(q[None, :, a:b].float(), k[None, :, a:b].float(),
                                                    v[None, :, a:b].float(), is_causal=True, enable_gqa=True,
                                                    scale=head_dim ** -0.5)[0].transpose(0, 1)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert out.shape == (T, heads, head_dim) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_prefill_refuses_bad_input(prefill_op):
    q = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    kv = torch.zeros(2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0"):
        prefill_op(q, kv, kv, torch.tensor([0, 5]), 1.0)
    with pytest.raises(RuntimeError, match="takes bfloat16"):
        prefill_op(q.float(), kv, kv, torch.tensor([0, 8]), 1.0)
