// Vector helpers shared by the CPU attention kernels (AVX-512 where the compiler targets it).
#pragma once
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace seesaw {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit left shift
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp), 16 lanes
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

#if defined(__AVX512DQ__)
// 2^x for x <= 0, 16 lanes: 2^floor(x) * 2^f with f = x - floor(x) in [0, 1) by one VREDUCEPS, 2^f by a degree-5
// polynomial (relative error under 2e-7, fitted for fp32 Horner evaluation), the power of two by VSCALEFPS (which
// floors x itself). Inputs below -126 are clamped there: no denormal results. About half the instructions of
// exp16, for softmax loops whose inputs are already scaled by log2(e).
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(0.001877575763501227f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.008989342488348484f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05582631751894951f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24015361070632935f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931530833244324f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999403953552f));
  return _mm512_scalef_ps(p, x);
}
#endif

// Lane j of the result is the sum of v[kSlot[j]]'s lanes when token j's vector is put in slot kSlot[j]:
// a 4-level shuffle tree, ~3 instructions per token instead of a full horizontal sum each.
constexpr int kSlot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
inline __m512 hsum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int k = 0; k < 4; ++k)
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)
    y[k] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * k], x[2 * k + 1]), _mm512_unpackhi_ps(x[2 * k], x[2 * k + 1]));
  const __m512d y0 = _mm512_castps_pd(y[0]), y1 = _mm512_castps_pd(y[1]);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(y0, y1)), _mm512_castpd_ps(_mm512_unpackhi_pd(y0, y1)));
}
#endif

#if defined(__AVX512BF16__)
// 16 fp32 lanes -> 16 bf16 at p, rounded to nearest even as c10::BFloat16 rounds
inline void store_bf16x16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}
// the same rounding, back in fp32 lanes (a bf16 intermediate of a computation done in fp32)
inline __m512 round_bf16x16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }
#endif

// s[t] = exp(s[t] - max s); returns 1 / sum
inline float softmax_inplace(float* s, int64_t len) {
  float m = -INFINITY;
  int64_t t = 0;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(-INFINITY);          // the max is exact in any order: 16 lanes at a time
  for (; t + kLanes <= len; t += kLanes) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + t));
  m = _mm512_reduce_max_ps(vmax);
#endif
  for (; t < len; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
  t = 0;
#if defined(__AVX512F__)
  __m512 vm = _mm512_set1_ps(m), vsum = _mm512_setzero_ps();
  for (; t + kLanes <= len; t += kLanes) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
    _mm512_storeu_ps(s + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; t < len; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return sum > 0.f ? 1.f / sum : 0.f;
}

}  // namespace seesaw
