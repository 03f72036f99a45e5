// The AMX path of bf16 causal prefill (see prefill_attention.cpp): per (sequence, query head, 16 query rows),
// the scores and P V are tile matmuls; the exact two-pass softmax between them runs in fp32 vectors.
//
// Operand layouts (all tiles 16 rows x 64 bytes; bf16 pairs are int32):
//   Qt [16 rows, D] bf16                 A tiles of 32 dims, rows D * 2 bytes apart
//   Kp [key block][D / 2][16 keys]       bf16 pairs (k[2i], k[2i + 1]): a B tile per (block of 16 keys, 32 dims)
//                                        is 16 dim pairs x 16 keys, rows 64 bytes apart
//   P  [16 rows, Lp] bf16                A tiles of 32 keys (Lp: visible keys rounded up to 32, zeros past them)
//   Vp [key pair][D]                     bf16 pairs (v[2p][d], v[2p + 1][d]): a B tile per (32 keys, 16 dims)
//                                        is 16 key pairs x 16 dims, rows D * 4 bytes apart
// Per tile of 16 query rows at positions p0 .. p0 + 15 (row r sees keys [0, p0 + r]):
//   S [16, 16 nkb] fp32 = Qt Kp^T                 (nkb = key blocks up to the diagonal one)
//   e = exp(scale S - row max), 0 past the row's last key; P = bf16(e)
//   O [16, D] fp32 = P Vp;  out = bf16(O / sum e)
// K and V are packed once per (sequence, KV head) and shared by the G query heads of that KV head.
#pragma once
#include "decode_amx.h"
#include "prefill_pack.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <ATen/Parallel.h>

#include <cstdlib>
#include <vector>

namespace seesaw {
namespace prefill_amx {

constexpr int64_t kRows = 16;                     // query rows per tile
constexpr int64_t kPad = 32;                      // keys of each packed sequence are padded to a multiple of this

// palette 1, all eight tiles 16 x 64 bytes: 0-3 fp32 accumulators [16, 16], 4 A (bf16 [16, 32]),
// 6-7 B (bf16 pairs [16, 16]); 5 unused
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// an uninitialised buffer of n T on a 64-byte boundary: tile rows that straddle cache lines load at half speed,
// and malloc's large blocks start 16 bytes past a page
template <typename T>
struct Aligned {
  explicit Aligned(int64_t n) : p(static_cast<T*>(std::aligned_alloc(64, round_up(n * sizeof(T) + 1, 64)))) {
    TORCH_CHECK(p != nullptr, "prefill_attention: out of memory");
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  T* data() { return p; }
  T& operator[](int64_t i) { return p[i]; }
  T* p;
};

// S[:, 0 .. 16 NB) = Qt [16, D] x the NB key blocks at kp (each 8 D int32); S rows ld floats apart
template <int NB>
inline void score_blocks(const bf16* qt, const int32_t* kp, int64_t D, float* S, int64_t ld) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  const int64_t block = 8 * D;
  for (int64_t c = 0; c < D / 32; ++c) {          // 32 dims (16 pairs) per step
    const int32_t* kc = kp + c * 256;
    _tile_loadd(4, qt + 32 * c, D * 2);
    _tile_loadd(6, kc, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) { _tile_loadd(7, kc + block, 64); _tile_dpbf16ps(1, 4, 7); }
    if constexpr (NB > 2) { _tile_loadd(6, kc + 2 * block, 64); _tile_dpbf16ps(2, 4, 6); }
    if constexpr (NB > 3) { _tile_loadd(7, kc + 3 * block, 64); _tile_dpbf16ps(3, 4, 7); }
  }
  _tile_stored(0, S, ld * 4);
  if constexpr (NB > 1) _tile_stored(1, S + 16, ld * 4);
  if constexpr (NB > 2) _tile_stored(2, S + 32, ld * 4);
  if constexpr (NB > 3) _tile_stored(3, S + 48, ld * 4);
}

// O[:, 16 c0 .. 16 c0 + 64) = P [16, 32 nchunk] x Vp rows [16 nchunk pairs, D]; P rows ldp bf16, O rows D floats apart
inline void value_cols(const bf16* P, int64_t ldp, const int32_t* vp, int64_t D, int64_t nchunk, int64_t c0, float* O) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t m = 0; m < nchunk; ++m) {          // 32 keys (16 pairs) per step
    const int32_t* vm = vp + 16 * m * D + 16 * c0;
    _tile_loadd(4, P + 32 * m, ldp * 2);
    _tile_loadd(6, vm, D * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, vm + 16, D * 4);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(6, vm + 32, D * 4);
    _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(7, vm + 48, D * 4);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, O + 16 * c0, D * 4);
  _tile_stored(1, O + 16 * c0 + 16, D * 4);
  _tile_stored(2, O + 16 * c0 + 32, D * 4);
  _tile_stored(3, O + 16 * c0 + 48, D * 4);
}

// one row: raw scores s, keys [0, len) visible -> p[0 .. Lp) = bf16 exp(scale s - max) (0 from len on); returns the
// fp32 sum of the exponentials. Lp is a multiple of 16 and >= len; scale > 0, so the max of the raw scores is taken
// and exp(scale (s - max)) = 2^(s c - max c) with c = scale log2(e): one FMA per lane before exp2_16.
inline float softmax_row(const float* s, int64_t len, int64_t Lp, float scale, bf16* p) {
  const int64_t full = len / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < full; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + t));
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + full));
  const float c = scale * 1.44269504088896341f;
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * c);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < full; t += 16) {
    const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + t), vc, vm));
    vsum = _mm512_add_ps(vsum, e);
    store_bf16x16(p + t, e);
  }
  int64_t t = full;
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + t), vc, vm)));
    vsum = _mm512_add_ps(vsum, e);
    store_bf16x16(p + t, e);
    t += 16;
  }
  for (; t < Lp; t += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + t), _mm256_setzero_si256());
  return _mm512_reduce_add_ps(vsum);
}

}  // namespace prefill_amx

// q [H, T, D], k/v [Hkv, T, D] bf16 (last dim contiguous), cu [B + 1] (checked by the caller), D 64 or 128
//   -> out [T, H, D] bf16
inline torch::Tensor prefill_attention_amx(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                           const int64_t* cu, int64_t B, float scale) {
  using namespace prefill_amx;
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(0), G = H / Hkv;
  const bf16 *qd = q.data_ptr<bf16>(), *kd = k.data_ptr<bf16>(), *vd = v.data_ptr<bf16>();

  // packed K/V of KV head h, sequence b: keys [(h * total + off[b]) .. + round_up(n, 32)), D / 2 int32 per key
  std::vector<int64_t> off(B + 1, 0);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    off[b + 1] = off[b] + round_up(cu[b + 1] - cu[b], kPad);
    longest = std::max(longest, cu[b + 1] - cu[b]);
  }
  const int64_t total = off[B];
  Aligned<int32_t> kp(Hkv * total * D / 2), vp(Hkv * total * D / 2);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, base = (h * total + off[b]) * D / 2;
      const int64_t n = cu[b + 1] - cu[b], padded = round_up(n, kPad);
      pack_keys(kd + h * k.stride(0) + cu[b] * k.stride(1), k.stride(1), n, padded, D,
                reinterpret_cast<bf16*>(kp.data() + base));
      pack_values(vd + h * v.stride(0) + cu[b] * v.stride(1), v.stride(1), n, padded, D,
                  reinterpret_cast<bf16*>(vp.data() + base));
    }
  });

  // work items (sequence, query head, tile of 16 rows); within a head, tiles alternate cheap / dear
  // (0, last, 1, last - 1, ...) so that the threads' contiguous ranges of items cost about the same
  std::vector<int64_t> item_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) item_start[b + 1] = item_start[b] + H * ((cu[b + 1] - cu[b] + kRows - 1) / kRows);
  auto out = torch::empty({T, H, D}, q.options());
  bf16* od = out.data_ptr<bf16>();
  const int64_t ld = round_up(longest, kPad) + 16, ldp = round_up(longest, kPad) + 32;   // off 4 KiB strides

  at::parallel_for(0, item_start[B], 1, [&](int64_t begin, int64_t end) {
    Config cfg;
    _tile_loadconfig(&cfg);
    Aligned<float> S(kRows * ld), O(kRows * D);          // every row stride is a multiple of 64 bytes
    Aligned<bf16> P(kRows * ldp), qt(kRows * D);
    float inv[kRows];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = std::upper_bound(item_start.begin(), item_start.end(), item) - item_start.begin() - 1;
      const int64_t n = cu[b + 1] - cu[b], tiles = (n + kRows - 1) / kRows, local = item - item_start[b];
      const int64_t head = local / tiles, i = local % tiles, tile = i % 2 == 0 ? i / 2 : tiles - 1 - i / 2;
      const int64_t p0 = tile * kRows, rows = std::min(kRows, n - p0), visible = p0 + rows, h = head / G;
      for (int64_t r = 0; r < kRows; ++r)                 // rows past the sequence repeat its last row
        std::memcpy(&qt[r * D], qd + head * q.stride(0) + (cu[b] + p0 + std::min(r, rows - 1)) * q.stride(1),
                    D * sizeof(bf16));
      const int32_t* kph = kp.data() + (h * total + off[b]) * D / 2;
      const int32_t* vph = vp.data() + (h * total + off[b]) * D / 2;
      const int64_t nkb = (visible + 15) / 16;
      for (int64_t kb = 0; kb < nkb; kb += 4) {
        const int32_t* kb_at = kph + kb * 8 * D;
        float* s_at = S.data() + kb * 16;
        switch (std::min<int64_t>(4, nkb - kb)) {
          case 1: score_blocks<1>(qt.data(), kb_at, D, s_at, ld); break;
          case 2: score_blocks<2>(qt.data(), kb_at, D, s_at, ld); break;
          case 3: score_blocks<3>(qt.data(), kb_at, D, s_at, ld); break;
          default: score_blocks<4>(qt.data(), kb_at, D, s_at, ld); break;
        }
      }
      const int64_t Lp = round_up(visible, 32);           // keys covered by the P V tiles
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t len = p0 + std::min(r, rows - 1) + 1;   // causal: keys [0, position]
        inv[r] = 1.f / softmax_row(&S[r * ld], len, Lp, scale, &P[r * ldp]);
      }
      for (int64_t c0 = 0; c0 < D / 16; c0 += 4) value_cols(P.data(), ldp, vph, D, Lp / 32, c0, O.data());
      for (int64_t r = 0; r < rows; ++r) {
        bf16* dst = od + ((cu[b] + p0 + r) * H + head) * D;
        const __m512 vinv = _mm512_set1_ps(inv[r]);
        for (int64_t d = 0; d < D; d += 16) store_bf16x16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(&O[r * D + d]), vinv));
      }
    }
    _tile_release();
  });
  return out;
}

}  // namespace seesaw
#endif
