// Fused element-wise layer ops for bf16 on CPU: one pass over memory where transformers' modules make
// six to eight. Each reproduces the rounding steps of the module it replaces (fp32 math, bf16 results):
//
//   rms_norm   x [T, N], w [N]   -> w * bf16(x * rsqrt(sum(x^2) / N + eps))     (LlamaRMSNorm)
//   silu_mul   g, u [T, N]       -> bf16(bf16(g / (1 + exp(-g))) * u)          (LlamaMLP's act(gate) * up)
//   rope       x [B, H, T, D], cos/sin [B, T, D] -> bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)): transformers'
//              apply_rotary_pos_emb on a prefill's q or k
//   rope_kv_write  one decode step's q/k/v (one matmul's [T, (Hq + 2 Hkv) * D]): rotary embedding of q and k
//              as transformers' apply_rotary_pos_emb rounds it (bf16(bf16(x * cos) + bf16(rotate_half(x) *
//              sin))), k and v written to their cache rows, q returned [T, Hq, D]
//
// rms_norm sums in torch's order and matches it bit for bit; silu's exp may differ in its last bit.
#include "kernels.h"
#include "vec.h"

#include <ATen/Parallel.h>

namespace seesaw {

#if defined(__AVX512BF16__)
namespace {
using bf16 = c10::BFloat16;

inline float round_bf16(float x) { return to_float(bf16(x)); }

inline __m256 square8(const bf16* p) {       // x^2 rounded to fp32 (the barrier stops fusing into an fma)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  v = _mm256_mul_ps(v, v);
  asm volatile("" : "+x"(v));
  return v;
}

// sum(x^2) of one row in the order torch 2.13 sums a contiguous fp32 row (ATen's SumKernel.cpp:
// vectorized_inner_sum -> row_sum -> multi_row_sum): 8-lane vectors, 4 interleaved accumulators cascaded
// in levels of `step` rows, then the scalar tail and the lanes one by one. Same order, same bits
// (tests/kv/test_layer_ops.py checks it against LlamaRMSNorm).
float sum_squares(const bf16* x, int64_t N) {
  constexpr int kIlp = 4, kLevels = 4, W = 8;
  const int64_t nvec = N / W, rows = nvec / kIlp;
  int64_t log2 = 0;
  while ((int64_t(1) << log2) < rows) ++log2;
  const int64_t power = std::max<int64_t>(4, log2 / kLevels), step = int64_t(1) << power, mask = step - 1;
  __m256 acc[kLevels][kIlp];
  for (auto& level : acc)
    for (auto& a : level) a = _mm256_setzero_ps();
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], square8(x + (i * kIlp + k) * W));
  };
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j) add_row(i++);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_row(i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  __m256 total = acc[0][0];
  for (int64_t v = rows * kIlp; v < nvec; ++v) total = _mm256_add_ps(total, square8(x + v * W));
  for (int k = 1; k < kIlp; ++k) total = _mm256_add_ps(total, acc[0][k]);
  float sum = 0.f;
  for (int64_t t = nvec * W; t < N; ++t) {
    volatile float sq = to_float(x[t]) * to_float(x[t]);
    sum += sq;
  }
  alignas(32) float lanes[W];
  _mm256_store_ps(lanes, total);
  for (float lane : lanes) sum += lane;
  return sum;
}

void rms_norm_row(const bf16* x, const bf16* w, int64_t N, float eps, bf16* out) {
  const float r = 1.f / std::sqrt(sum_squares(x, N) / static_cast<float>(N) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  int64_t i = 0;
  for (; i + 16 <= N; i += 16) {
    const __m512 h = round_bf16x16(_mm512_mul_ps(load16(x + i), vr));
    store_bf16x16(out + i, _mm512_mul_ps(load16(w + i), h));
  }
  for (; i < N; ++i) out[i] = bf16(to_float(w[i]) * round_bf16(to_float(x[i]) * r));
}

void silu_mul_span(const bf16* g, const bf16* u, int64_t n, bf16* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = load16(g + i);
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    store_bf16x16(out + i, _mm512_mul_ps(round_bf16x16(s), load16(u + i)));
  }
  for (; i < n; ++i) {
    const float x = to_float(g[i]);
    out[i] = bf16(round_bf16(x / (1.f + std::exp(-x))) * to_float(u[i]));
  }
}
// x [D] -> out [D]: bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[D/2:], x[:D/2])
void rope_row(const bf16* x, const bf16* cos, const bf16* sin, int64_t D, bf16* out) {
  const int64_t half = D / 2;
  int64_t d = 0;
  if (half % 16 == 0) {
    const __m512 sign = _mm512_set1_ps(-0.f);
    for (; d < D; d += 16) {
      const __m512 a = round_bf16x16(_mm512_mul_ps(load16(x + d), load16(cos + d)));
      const __m512 r = d < half ? _mm512_xor_ps(load16(x + d + half), sign) : load16(x + d - half);
      store_bf16x16(out + d, _mm512_add_ps(a, round_bf16x16(_mm512_mul_ps(r, load16(sin + d)))));
    }
  }
  for (; d < D; ++d) {
    const float r = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
    out[d] = bf16(round_bf16(to_float(x[d]) * to_float(cos[d])) + round_bf16(r * to_float(sin[d])));
  }
}
}  // namespace

torch::Tensor rope_kv_write(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor slots, int64_t heads, int64_t kv_heads) {
  const int64_t D = k_cache.size(-1);
  const int64_t T = slots.numel(), width = (heads + 2 * kv_heads) * D;
  for (const auto& t : {qkv, cos, sin, k_cache, v_cache})
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "rope_kv_write takes bfloat16");
  TORCH_CHECK(qkv.numel() == T * width && qkv.stride(-1) == 1, "rope_kv_write: qkv must be [", T, ", ", width, "]");
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D, "rope_kv_write: cos and sin must be [", T, ", ", D, "]");
  TORCH_CHECK(k_cache.size(-2) == kv_heads && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes(), "rope_kv_write: caches must be contiguous [N, bs, ", kv_heads, ", D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "rope_kv_write: slots must be int64");
  auto x = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous(), sl = slots.contiguous();
  auto q = torch::empty({T, heads, D}, x.options());
  const bf16 *xd = x.data_ptr<bf16>(), *cd = c.data_ptr<bf16>(), *sd = s.data_ptr<bf16>();
  bf16 *qd = q.data_ptr<bf16>(), *kd = k_cache.data_ptr<bf16>(), *vd = v_cache.data_ptr<bf16>();
  const int64_t* slot = sl.data_ptr<int64_t>();
  const int64_t rows = k_cache.numel() / (kv_heads * D);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < rows, "rope_kv_write: slot ", slot[t], " outside the cache's ", rows, " rows");
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16 *row = xd + t * width, *ct = cd + t * D, *st = sd + t * D;
      for (int64_t h = 0; h < heads; ++h) rope_row(row + h * D, ct, st, D, qd + (t * heads + h) * D);
      bf16 *k_row = kd + slot[t] * kv_heads * D, *v_row = vd + slot[t] * kv_heads * D;
      for (int64_t h = 0; h < kv_heads; ++h) rope_row(row + (heads + h) * D, ct, st, D, k_row + h * D);
      std::memcpy(v_row, row + (heads + kv_heads) * D, kv_heads * D * sizeof(bf16));
    }
  });
  return q;
}

torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  for (const auto& t : {x, cos, sin}) TORCH_CHECK(t.scalar_type() == at::kBFloat16, "rope takes bfloat16");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x must be [B, H, T, D] with its last dim contiguous");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) &&
              cos.size(1) == T && cos.size(2) == D, "rope: cos and sin must be [B or 1, ", T, ", ", D, "]");
  auto c = cos.contiguous(), s = sin.contiguous();
  auto out = torch::empty_like(x);                          // x's layout (a transposed [B, T, H, D] stays one)
  const bf16 *xd = x.data_ptr<bf16>(), *cd = c.data_ptr<bf16>(), *sd = s.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const int64_t cb = c.size(0) == 1 ? 0 : T * D;
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, t = r % T;
      const bf16 *ct = cd + b * cb + t * D, *st = sd + b * cb + t * D;
      for (int64_t h = 0; h < H; ++h)
        rope_row(xd + b * x.stride(0) + h * x.stride(1) + t * x.stride(2), ct, st, D,
                 od + b * out.stride(0) + h * out.stride(1) + t * out.stride(2));
    }
  });
  return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm takes bfloat16");
  const int64_t N = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == N, "rms_norm: weight must be [", N, "]");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t T = xc.numel() / N;
  const bf16 *xd = xc.data_ptr<bf16>(), *wd = wc.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rms_norm_row(xd + t * N, wd, N, e, od + t * N);
  });
  return out;
}

// The distance between rows of x viewed as [rows, N] (N = its last dim, contiguous), or -1 if no one stride
// serves (the two halves of one matmul's output, split along the last dim, are such views).
int64_t row_stride(const torch::Tensor& x) {
  if (x.dim() < 2 || x.stride(-1) != 1) return x.dim() == 1 && x.stride(0) == 1 ? x.size(0) : -1;
  const int64_t stride = x.stride(-2);
  for (int64_t d = x.dim() - 2; d > 0; --d)
    if (x.size(d - 1) > 1 && x.stride(d - 1) != x.stride(d) * x.size(d)) return -1;
  return stride;
}

torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.scalar_type() == at::kBFloat16 && u.scalar_type() == at::kBFloat16, "silu_mul takes bfloat16");
  TORCH_CHECK(g.sizes() == u.sizes(), "silu_mul: gate and up must have one shape");
  if (row_stride(g) < 0) g = g.contiguous();
  if (row_stride(u) < 0) u = u.contiguous();
  const int64_t N = g.dim() ? g.size(-1) : 1, rows = N ? g.numel() / N : 0, gs = row_stride(g), us = row_stride(u);
  auto out = torch::empty(g.sizes(), g.options());             // contiguous [..., N]
  const bf16 *gd = g.data_ptr<bf16>(), *ud = u.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_span(gd + r * gs, ud + r * us, N, od + r * N);
  });
  return out;
}

#else   // no AVX512-BF16: the caller keeps transformers' modules

torch::Tensor rms_norm(torch::Tensor, torch::Tensor, double) {
  TORCH_CHECK(false, "rms_norm was not compiled in (needs AVX512-BF16)");
}
torch::Tensor silu_mul(torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "silu_mul was not compiled in (needs AVX512-BF16)");
}
torch::Tensor rope(torch::Tensor, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "rope was not compiled in (needs AVX512-BF16)");
}
torch::Tensor rope_kv_write(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                            int64_t, int64_t) {
  TORCH_CHECK(false, "rope_kv_write was not compiled in (needs AVX512-BF16)");
}

#endif

}  // namespace seesaw
