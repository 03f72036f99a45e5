// The CPU kernels' entry points: attention and fused layer ops (bound to Python in bindings.cpp).
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace seesaw {

// q [B, H, D], caches [N, bs, Hkv, D], block_tables [B, M] int64, context_lens [B] int64 -> [B, H, D]
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           int64_t window);

// q [H, T, D], k/v [Hkv, T, D] (bf16, last dim contiguous), cu_seqlens [B + 1] int64 -> [T, H, D]
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens,
                                double scale);

// each row's first maximum of fp32 x [B, V] -> (values [B], indices [B] int64), as x.max(dim=-1)
std::tuple<torch::Tensor, torch::Tensor> row_max(torch::Tensor x);

// whether prefill_attention was compiled in (needs AVX512-BF16)
bool has_prefill_attention();

// let prefill_attention use the tile unit (AMX) where the CPU and Linux allow it (the default), or keep it on the
// AVX512-BF16 path; returns whether the AMX path is in use now
bool set_prefill_amx(bool enable);

// bf16, last dim contiguous: x [..., N], w [N] -> [..., N] (LlamaRMSNorm); g, u [..., N] -> silu(g) * u
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u);

// x [B, H, T, D] (last dim contiguous), cos/sin [B or 1, T, D], all bf16 -> x rotated as transformers'
// apply_rotary_pos_emb rounds it, in x's layout
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

// one decode step: qkv [T, (H + 2 Hkv) * D] bf16 (q, k, v of T tokens), cos/sin [T, D] -> q [T, H, D] rotated;
// k rotated and v written to rows `slots` [T] int64 of the caches [N, bs, Hkv, D] (as transformers rounds rope)
torch::Tensor rope_kv_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor slots, int64_t heads, int64_t kv_heads);

// bf16 linears at decode's row counts (decode_linear.cpp): w [N, K] -> packed [ceil(N / 16), K / 2, 16, 2];
// x [..., K], bias [N] or none -> [..., N]
torch::Tensor pack_linear(torch::Tensor w);
torch::Tensor linear_packed(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N);
bool has_linear_packed();

}  // namespace seesaw
