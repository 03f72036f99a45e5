// The bf16 path of paged decode (see paged_decode.cpp): bf16 cache and queries end to end, dot products on
// bf16 pairs with vdpbf16ps, scores and softmax in fp32.
//
//   q [G, D] bf16      the G query heads sharing one KV head
//   key(t), value(t)   token t's K / V row (bf16 [D]) of that KV head, read in place from the paged pool
//   -> out [G, D] bf16
#pragma once
#include "vec.h"

#include <vector>

namespace seesaw {
#if defined(__AVX512BF16__)
// bf16 cache and queries: dot products on bf16 pairs with vdpbf16ps (no conversion of the cache to fp32).
using bf16 = c10::BFloat16;
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
template <int Hint = _MM_HINT_T0>
inline void prefetch_row(const void* p, int64_t nbytes) {
  for (int64_t off = 0; off < nbytes; off += 64)
    _mm_prefetch(static_cast<const char*>(p) + off, static_cast<_mm_hint>(Hint));
}
// How far ahead (tokens) the passes prefetch their rows, into L2. A layer's cache comes from memory (the step's
// other layers have evicted it), and one head's rows are strided (Hkv * D apart), so the hardware prefetcher
// alone leaves each pass waiting on memory; the distance covers a DRAM latency at the passes' rate. Into L2,
// not L1: that many lines in flight at once overrun L1's miss buffers. The value passes take the level as `Hint`
// because the AMX path (decode_amx.h) runs them too, prefetching into L1 as it always has.
constexpr int64_t kPrefetchKeys = 48, kPrefetchValues = 24;
constexpr int kDecodeHint = _MM_HINT_T1;

// scores[g * len + t] = scale * q_g . k_t; q: [G, D] bf16 rows; CK = D / 32 vectors per row
template <int CK, typename KeyPtr>
void score_pass_bf16(const bf16* q, KeyPtr key, float* scores, int64_t G, int64_t len, float scale) {
  constexpr int64_t D = CK * 32;
  const bf16* rows[16];
  __m512 acc[16];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
    for (int j = 0; j < 16; ++j) rows[j] = key(t0 + (j < n ? j : 0));
    for (int64_t t = t0 + kPrefetchKeys; t < std::min(t0 + kPrefetchKeys + 16, len); ++t)
      prefetch_row<kDecodeHint>(key(t), D * 2);
    for (int64_t g = 0; g < G; ++g) {
      __m512i qv[CK];
#pragma GCC unroll 4
      for (int c = 0; c < CK; ++c) qv[c] = _mm512_loadu_si512(q + g * D + c * 32);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const bf16* k = rows[j];
        __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(qv[0]), as_bh(_mm512_loadu_si512(k)));
        for (int c = 1; c < CK; ++c) a = _mm512_dpbf16_ps(a, as_bh(qv[c]), as_bh(_mm512_loadu_si512(k + c * 32)));
        acc[kSlot[j]] = a;
      }
      _mm512_mask_storeu_ps(scores + g * len + t0, static_cast<__mmask16>((1u << n) - 1),
                            _mm512_mul_ps(hsum16(acc), vscale));
    }
  }
}

// out[g, :] = sum_t p[g, t] v_t for GB query heads; pair(g, t) (t even) is the int32 holding bf16 p[g, t] in its
// low half and p[g, t + 1] in its high half (0 past the last token); CV = D / 16 accumulators per head. Two
// consecutive tokens' rows are interleaved per 16-bit element (unpacklo/hi), so lane i of accumulator c
// holds dim 32 (c / 2) + 4 (c % 2) + 8 (i / 4) + i % 4.
template <int CV, int GB, int Hint, typename PairAt, typename ValuePtr>
void value_pass_bf16(PairAt pair, ValuePtr value, float* out, int64_t len) {
  constexpr int64_t D = CV * 16;
  __m512 acc[GB][CV];
#pragma GCC unroll 4
  for (int g = 0; g < GB; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < CV; ++c) acc[g][c] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t = 0; t < len; t += 2) {
    const bf16* v0 = value(t);
    const bf16* v1 = t + 1 < len ? value(t + 1) : nullptr;
    if (t + kPrefetchValues < len) prefetch_row<Hint>(value(t + kPrefetchValues), D * 2);
    if (t + kPrefetchValues + 1 < len) prefetch_row<Hint>(value(t + kPrefetchValues + 1), D * 2);
    __m512i x[CV];
#pragma GCC unroll 4
    for (int m = 0; m < CV / 2; ++m) {
      const __m512i r = _mm512_loadu_si512(v0 + 32 * m), s = v1 ? _mm512_loadu_si512(v1 + 32 * m) : zero;
      x[2 * m] = _mm512_unpacklo_epi16(r, s);
      x[2 * m + 1] = _mm512_unpackhi_epi16(r, s);
    }
#pragma GCC unroll 4
    for (int g = 0; g < GB; ++g) {
      const __m512i pb = _mm512_set1_epi32(pair(g, t));
#pragma GCC unroll 8
      for (int c = 0; c < CV; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], as_bh(pb), as_bh(x[c]));
    }
  }
  float lanes[16];
#pragma GCC unroll 4
  for (int g = 0; g < GB; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < CV; ++c) {
      _mm512_storeu_ps(lanes, acc[g][c]);
      for (int i = 0; i < 16; ++i) out[g * D + 32 * (c / 2) + 4 * (c % 2) + 8 * (i / 4) + i % 4] = lanes[i];
    }
}

// acc [G, D] = the value pass of G query heads, GB of them per pass over the values
template <int CV, int Hint, typename PairAt, typename ValuePtr>
void value_heads_bf16(PairAt pair, ValuePtr value, float* acc, int64_t G, int64_t len) {
  constexpr int kMaxGroup = CV >= 8 ? 2 : 4;
  constexpr int64_t D = CV * 16;
  auto from = [&](int64_t g0) { return [&pair, g0](int64_t g, int64_t t) { return pair(g0 + g, t); }; };
  int64_t g = 0;
  for (; g + kMaxGroup <= G; g += kMaxGroup)
    value_pass_bf16<CV, kMaxGroup, Hint>(from(g), value, acc + g * D, len);
  // the rest in one pass over the values (each head's sums are independent: same result as one by one)
  if constexpr (kMaxGroup == 4) {
    if (G - g == 3) return value_pass_bf16<CV, 3, Hint>(from(g), value, acc + g * D, len);
    if (G - g == 2) return value_pass_bf16<CV, 2, Hint>(from(g), value, acc + g * D, len);
  }
  for (; g < G; ++g) value_pass_bf16<CV, 1, Hint>(from(g), value, acc + g * D, len);
}

// one (sequence, KV head) pair, bf16 end to end: q [G, D] -> out [G, D]; false when D is not 64 or 128
template <typename KeyPtr, typename ValuePtr>
bool attend_bf16(const bf16* q, KeyPtr key, ValuePtr value, bf16* out, int64_t G, int64_t D, int64_t len,
                 float scale, std::vector<float>& scores, std::vector<bf16>& probs, std::vector<float>& acc) {
  if (D != 64 && D != 128) return false;
  // the rows the passes' own prefetches do not reach: the first keys, and the first values (read after the scores)
  for (int64_t t = 0; t < std::min(kPrefetchKeys, len); ++t) prefetch_row<kDecodeHint>(key(t), D * 2);
  for (int64_t t = 0; t < std::min(kPrefetchValues, len); ++t) prefetch_row<kDecodeHint>(value(t), D * 2);
  scores.resize(G * std::max<int64_t>(len, 1));
  if (D == 64) score_pass_bf16<2>(q, key, scores.data(), G, len, scale);
  else score_pass_bf16<4>(q, key, scores.data(), G, len, scale);
  const int64_t ldp = len + 2;
  probs.assign(G * ldp, bf16(0.f));
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) {
    inv_sum[g] = softmax_inplace(&scores[g * len], len);           // unnormalised exp, in (0, 1]
    int64_t t = 0;
    for (; t + 16 <= len; t += 16)
      store_bf16x16(&probs[g * ldp + t], _mm512_loadu_ps(&scores[g * len + t]));
    for (; t < len; ++t) probs[g * ldp + t] = bf16(scores[g * len + t]);
  }
  acc.resize(G * D);
  auto pair = [&probs, ldp](int64_t g, int64_t t) {                // (p[g, t], p[g, t + 1])
    int32_t both;
    std::memcpy(&both, &probs[g * ldp + t], sizeof(both));
    return both;
  };
  if (D == 64) value_heads_bf16<4, kDecodeHint>(pair, value, acc.data(), G, len);
  else value_heads_bf16<8, kDecodeHint>(pair, value, acc.data(), G, len);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = bf16(acc[g * D + i] * inv_sum[g]);
  return true;
}
#endif

}  // namespace seesaw
