// Paged decode attention for CPUs: one new query token per sequence, read straight from the paged pool.
//
//   q            [B, H, D]              the new token's queries (any float dtype, contiguous)
//   k_cache      [N, bs, Hkv, D]        one layer of the pool (same dtype as v_cache)
//   v_cache      [N, bs, Hkv, D]
//   block_tables [B, M] int64           block ids of each sequence (only the first ceil(n / bs) are read)
//   context_lens [B] int64              n: tokens in cache, the new one included
//   -> out       [B, H, D]              q's dtype
//
// Query head h attends with KV head h / (H / Hkv) (transformers' repeat_kv order). A sequence sees keys
// [max(0, n - window), n) when window > 0, else [0, n). Work is split over sequences, one range of about
// the same number of cached tokens per thread; each (sequence, KV head) pair reads its keys and values once
// for all the query heads that share them. Softmax is exact (two passes over the scores, fp32), so results
// match a reference attention up to summation order.
// bf16 q and cache take the tile unit where there is one (decode_amx.h: work split over sequences, the
// scores of all a sequence's heads as one matmul per 16-token chunk), else AVX512-BF16 (decode_bf16.h).
#include "kernels.h"
#include "vec.h"
#include "decode_bf16.h"
#include "decode_amx.h"

#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

namespace seesaw {
namespace {

// scores[g * len + t] = q_g . k_t for t in [0, len)
template <typename T, typename KeyPtr>
void score_pass_scalar(const float* qf, KeyPtr key, float* scores, int64_t G, int64_t D, int64_t len) {
  for (int64_t t = 0; t < len; ++t) {
    const T* k = key(t);
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < D; ++i) acc += qf[g * D + i] * to_float(k[i]);
      scores[g * len + t] = acc;
    }
  }
}

#if defined(__AVX512F__)
// C = D / 16 vectors per row; 16 tokens at a time, one vector of 16 scores per query head
template <typename T, int C, typename KeyPtr>
void score_pass_avx512(const float* qf, KeyPtr key, float* scores, int64_t G, int64_t len) {
  const T* rows[16];
  __m512 acc[16];
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    for (int j = 0; j < 16; ++j) rows[j] = key(t0 + (j < n ? j : 0));
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[C];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(qf + g * C * kLanes + c * kLanes);
      for (int j = 0; j < 16; ++j) {
        const T* k = rows[j];
        __m512 a = _mm512_mul_ps(qv[0], load16(k));
        for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[c], load16(k + c * kLanes), a);
        acc[kSlot[j]] = a;
      }
      _mm512_mask_storeu_ps(scores + g * len + t0, static_cast<__mmask16>((1u << n) - 1), hsum16(acc));
    }
  }
}

// acc[g] += sum_t p[g * len + t] * v_t, for GB query heads at a time (accumulators stay in registers)
template <typename T, int C, int GB, typename ValuePtr>
void value_pass_avx512(const float* p, ValuePtr value, float* out, int64_t len) {
  __m512 acc[GB][C];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const T* v = value(t);
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(v + c * kLanes);
    for (int g = 0; g < GB; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * len + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * C * kLanes + c * kLanes, acc[g][c]);
}

template <typename T, int C, typename ValuePtr>
void value_pass_heads(const float* p, ValuePtr value, float* acc, int64_t G, int64_t len) {
  constexpr int kMaxGroup = C >= 8 ? 2 : 4;    // GB * C accumulators + C values fit in 32 registers
  int64_t g = 0;
  for (; g + kMaxGroup <= G; g += kMaxGroup)
    value_pass_avx512<T, C, kMaxGroup>(p + g * len, value, acc + g * C * kLanes, len);
  for (; g < G; ++g) value_pass_avx512<T, C, 1>(p + g * len, value, acc + g * C * kLanes, len);
}
#endif

template <typename T, typename KeyPtr>
void score_pass(const float* qf, KeyPtr key, float* scores, int64_t G, int64_t D, int64_t len) {
#if defined(__AVX512F__)
  if (D == 64) return score_pass_avx512<T, 4>(qf, key, scores, G, len);
  if (D == 128) return score_pass_avx512<T, 8>(qf, key, scores, G, len);
#endif
  score_pass_scalar<T>(qf, key, scores, G, D, len);
}

// acc[g] += sum_t p[g * len + t] * v_t
template <typename T, typename ValuePtr>
void value_pass(const float* p, ValuePtr value, float* acc, int64_t G, int64_t D, int64_t len) {
#if defined(__AVX512F__)
  if (D == 64) return value_pass_heads<T, 4>(p, value, acc, G, len);
  if (D == 128) return value_pass_heads<T, 8>(p, value, acc, G, len);
#endif
  for (int64_t t = 0; t < len; ++t) {
    const T* v = value(t);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < D; ++i) acc[g * D + i] += p[g * len + t] * to_float(v[i]);
  }
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
// bf16 end to end on the tile unit (decode_amx.h): work split over (sequence, range of nh KV heads whose
// nh * G query heads fit one 16-column tile); needs D in {64, 128}, G <= 16 and blocks of 2^shift >= 16 tokens
void decode_bf16_amx(const bf16* q, const bf16* k_cache, const bf16* v_cache, const int64_t* tables,
                     const int64_t* lens, bf16* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                     int64_t shift, int64_t M, float scale, int64_t window) {
  const int64_t G = H / Hkv, bs = int64_t{1} << shift;
  const int64_t nh = std::min<int64_t>(Hkv, 16 / G), ranges = (Hkv + nh - 1) / nh;
  at::parallel_for(0, B * ranges, 1, [&](int64_t begin, int64_t end) {
    const TileConfig config;
    _tile_loadconfig(&config);
    std::vector<float> s, acc;
    std::vector<int32_t> pairs, qd;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / ranges, h0 = unit % ranges * nh, heads = std::min(nh, Hkv - h0);
      const int64_t n = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, n - window) : 0, first = start / 16 * 16;
      const int64_t* table = tables + b * M;
      auto slot = [=](int64_t pos) { return (table[pos >> shift] << shift) + (pos & (bs - 1)); };
      auto row = [=](int64_t t) { return k_cache + (slot(first + t) * Hkv + h0) * D; };
      auto value = [=](int64_t h, int64_t t) { return v_cache + (slot(start + t) * Hkv + h0 + h) * D; };
      attend_amx(q + (b * H + h0 * G) * D, row, Hkv * D, value, out + (b * H + h0 * G) * D, heads, G, D,
                 start - first, n - start, scale, s, pairs, qd, acc);
    }
    _tile_release();
  });
}
#endif

// [0 = b_0, b_1, ..., b_parts = B]: `parts` contiguous ranges of sequences, each about the same number of
// visible cached tokens (plus a fixed cost per sequence), one per thread
std::vector<int64_t> token_balanced_ranges(const int64_t* lens, int64_t B, int64_t window, int64_t parts) {
  auto cost = [&](int64_t b) { return (window > 0 ? std::min(lens[b], window) : lens[b]) + 16; };
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += cost(b);
  parts = std::max<int64_t>(1, std::min(parts, B));
  std::vector<int64_t> bounds{0};
  int64_t done = 0;
  for (int64_t b = 0; b < B; ++b) {
    done += cost(b);
    if (static_cast<int64_t>(bounds.size()) < parts && done * parts >= total * static_cast<int64_t>(bounds.size()))
      bounds.push_back(b + 1);
  }
  bounds.push_back(B);
  return bounds;
}

template <typename Q, typename T>
void decode_kernel(const Q* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens,
                   Q* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t M,
                   float scale, int64_t window) {
  const int64_t G = H / Hkv;
  int64_t shift = -1;                            // log2(bs) when bs is a power of two
  for (int64_t k = 0; k < 31; ++k)
    if ((int64_t{1} << k) == bs) shift = k;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<Q, c10::BFloat16> && std::is_same_v<T, c10::BFloat16>) {
    if ((D == 64 || D == 128) && shift >= 4 && G <= 16 && amx_usable())
      return decode_bf16_amx(q, k_cache, v_cache, tables, lens, out, B, H, Hkv, D, shift, M, scale, window);
  }
#endif
  // Each thread takes a contiguous range of sequences holding about the same number of cached tokens (a static
  // split by count leaves one thread waiting on the other's long contexts), and runs a sequence's KV heads in
  // turn over one table of its rows.
  const std::vector<int64_t> bounds = token_balanced_ranges(lens, B, window, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    std::vector<c10::BFloat16> probs;
    std::vector<int64_t> rows;                   // element offset of each visible token's cache row
    for (int64_t b = bounds[begin]; b < bounds[end]; ++b) {
      const int64_t n = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t len = n - start;
      const int64_t* table = tables + b * M;
      rows.resize(len);
      for (int64_t t = 0; t < len; ++t) {        // block sizes are powers of two in practice
        const int64_t pos = start + t;
        const int64_t block = shift >= 0 ? pos >> shift : pos / bs, offset = shift >= 0 ? pos & (bs - 1) : pos % bs;
        rows[t] = (table[block] * bs + offset) * Hkv * D;
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        auto row = [&rows, h, D](const T* cache) {     // token t's row of KV head h
          return [base = cache + h * D, r = rows.data()](int64_t t) { return base + r[t]; };
        };
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<Q, c10::BFloat16> && std::is_same_v<T, c10::BFloat16>) {
          if (attend_bf16(q + (b * H + h * G) * D, row(k_cache), row(v_cache), out + (b * H + h * G) * D, G, D, len,
                          scale, scores, probs, acc))
            continue;
        }
#endif
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < D; ++i) qf[g * D + i] = to_float(q[(b * H + h * G + g) * D + i]) * scale;
        scores.resize(G * std::max<int64_t>(len, 1));
        std::fill(acc.begin(), acc.end(), 0.f);
        score_pass<T>(qf.data(), row(k_cache), scores.data(), G, D, len);
        std::vector<float> inv_sum(G);
        for (int64_t g = 0; g < G; ++g) inv_sum[g] = softmax_inplace(&scores[g * len], len);
        value_pass<T>(scores.data(), row(v_cache), acc.data(), G, D, len);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < D; ++i)
            out[(b * H + h * G + g) * D + i] = static_cast<Q>(acc[g * D + i] * inv_sum[g]);
      }
    }
  });
}

// f(T{}) for T in float, bfloat16, half
template <typename F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode supports float32, bfloat16 and float16, got ", type);
  }
}

template <typename Q>
void dispatch_cache(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                    const torch::Tensor& tables, const torch::Tensor& lens, torch::Tensor& out,
                    float scale, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), bs = k.size(1), Hkv = k.size(2);
  const int64_t M = tables.size(1);
  dispatch_float(k.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    decode_kernel<Q, T>(q.data_ptr<Q>(), k.data_ptr<T>(), v.data_ptr<T>(), tables.data_ptr<int64_t>(),
                        lens.data_ptr<int64_t>(), out.data_ptr<Q>(), B, H, Hkv, D, bs, M, scale, window);
  });
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           int64_t window) {
  TORCH_CHECK(q.dim() == 3, "q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [N, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "head_dim of q (", q.size(2), ") and cache (", k_cache.size(3),
              ") differ");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads (", q.size(1), ") not a multiple of KV heads (",
              k_cache.size(2), ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0), "block_tables must be [B, M]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0), "context_lens must be [B]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(context_lens.numel() == 0 ||
                  context_lens.max().item<int64_t>() <= block_tables.size(1) * k_cache.size(1),
              "a context length exceeds its block table");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  const float s = static_cast<float>(scale);
  dispatch_float(q.scalar_type(), [&](auto tag) {
    dispatch_cache<decltype(tag)>(q, k_cache, v_cache, block_tables, context_lens, out, s, window);
  });
  return out;
}

}  // namespace seesaw
