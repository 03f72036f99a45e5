// The AMX path of bf16 paged decode (see paged_decode.cpp): one sequence's scores for all its query heads
// as one small matmul per 16-token chunk of a block, on the tile unit.
//
// A token's cache row holds every KV head: row [Hkv * D] bf16. For a range of KV heads [h0, h0 + nh) with
// nh * G <= 16 query heads, the scores of 16 tokens are
//   S [16 tokens, 16 heads] = K_rows [16, nh * D] x Qd [nh * D, 16]
// where Qd is block-diagonal: column n (query head h0 * G + n) holds that head's query in the rows of its
// own KV head (n / G) and zeros elsewhere, so one matmul over the contiguous row reads each K row once for
// all its query heads. Softmax runs down the token axis with the heads in vector lanes; values stay on
// AVX512-BF16 (value_pass_bf16), with the probabilities of two tokens paired per head.
#pragma once
#include "decode_bf16.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

namespace seesaw {

// The kernel asks Linux once for the tile state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); false when refused.
inline bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// palette 1, three 16 x 64-byte tiles: 0 = S (fp32 [16, 16]), 1 = K rows (bf16 [16, 32]), 2 = Qd (bf16 pairs [16, 16])
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64};
  uint8_t rows[16] = {16, 16, 16};
};

// Qd in the tiles' pair layout: qd[(c * 16 + i) * 16 + n] = bf16 pair (dims 32 c + 2 i, + 1) of the nh * D
// row against query head n; q: [nh * G, D] bf16 rows (the heads of KV heads h0 .. h0 + nh)
inline void build_query_tiles(const bf16* q, int64_t nh, int64_t G, int64_t D, int32_t* qd) {
  const int64_t chunks = nh * D / 32;
  std::fill(qd, qd + chunks * 256, 0);
  for (int64_t n = 0; n < nh * G; ++n) {
    const int64_t h = n / G;
    for (int64_t d = 0; d < D; d += 2) {
      const int64_t row = h * D + d;                                 // in the concatenated [nh * D] row
      std::memcpy(&qd[(row / 32 * 16 + row % 32 / 2) * 16 + n], q + n * D + d, sizeof(int32_t));
    }
  }
}

// one sequence, KV heads [h0, h0 + nh): q [nh * G, D] -> out [nh * G, D] bf16
//   row(t)      token t's cache row of K at KV head h0 (t counted from `first`, which starts a 16-token chunk
//               of a block: chunks never straddle blocks), rows 16 apart are `ld` bf16 apart within a chunk
//   value(h, t) token t's V row of KV head h0 + h
//   tokens [skip, skip + len) of the chunks are the visible ones
template <typename RowPtr, typename ValuePtr>
void attend_amx(const bf16* q, RowPtr row, int64_t ld, ValuePtr value, bf16* out, int64_t nh, int64_t G,
                int64_t D, int64_t skip, int64_t len, float scale, std::vector<float>& s,
                std::vector<int32_t>& pairs, std::vector<int32_t>& qd, std::vector<float>& acc) {
  const int64_t chunks = nh * D / 32, heads = nh * G, rows = skip + len, nchunk = (rows + 15) / 16;
  qd.resize(chunks * 256);
  build_query_tiles(q, nh, G, D, qd.data());
  s.resize(nchunk * 256);                                            // S [nchunk * 16 tokens, 16 heads]
  for (int64_t k = 0; k < nchunk; ++k) {
    const bf16* base = row(16 * k);
    if (k + 1 < nchunk) prefetch_row(row(16 * k + 16), 16 * ld * 2);
    _tile_zero(0);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(1, base + 32 * c, ld * 2);
      _tile_loadd(2, qd.data() + c * 256, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, s.data() + k * 256, 64);
  }
  // softmax down the tokens, one lane per head: e = exp(scale * s - max), sums per lane
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY), vsum = _mm512_setzero_ps();
  float* sv = s.data() + skip * 16;                                  // the visible rows [len, 16]
  for (int64_t t = 0; t < len; ++t) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sv + t * 16), vscale);
    _mm512_storeu_ps(sv + t * 16, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  for (int64_t t = 0; t < len; ++t) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sv + t * 16), vmax));
    _mm512_storeu_ps(sv + t * 16, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  // pairs [(len + 1) / 2, 16] int32: bf16 (e_t, e_t+1) of each head for t = 0, 2, ...
  const int64_t npair = (len + 1) / 2;
  pairs.resize(npair * 16);
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t i = 0; i < npair; ++i) {
    const __m512 e0 = _mm512_loadu_ps(sv + 32 * i);
    const __m512 e1 = 2 * i + 1 < len ? _mm512_loadu_ps(sv + 32 * i + 16) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);       // [e0 (16 bf16), e1 (16 bf16)]
    _mm512_storeu_si512(pairs.data() + 16 * i, _mm512_permutexvar_epi16(interleave, both));
  }
  alignas(64) float inv[16];                                          // 1 / sum (0 when nothing is visible)
  _mm512_store_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(vsum, _mm512_setzero_ps(), _CMP_GT_OQ),
                                           _mm512_set1_ps(1.f), vsum));
  acc.resize(heads * D);
  for (int64_t h = 0; h < nh; ++h) {
    auto pair = [&, col = h * G](int64_t g, int64_t t) { return pairs[t / 2 * 16 + col + g]; };
    auto v = [&, h](int64_t t) { return value(h, t); };
    if (D == 64) value_heads_bf16<4, _MM_HINT_T0>(pair, v, acc.data() + h * G * D, G, len);
    else value_heads_bf16<8, _MM_HINT_T0>(pair, v, acc.data() + h * G * D, G, len);
  }
  for (int64_t n = 0; n < heads; ++n)
    for (int64_t i = 0; i < D; ++i) out[n * D + i] = bf16(acc[n * D + i] * inv[n]);
}

}  // namespace seesaw
#endif
