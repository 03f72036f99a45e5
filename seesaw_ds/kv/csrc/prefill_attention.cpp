// Causal prefill attention over packed sequences, bf16, with AVX512-BF16 dot products (vdpbf16ps).
//
//   q [H, T, D], k [Hkv, T, D], v [Hkv, T, D]   bf16, last dim contiguous (any head / token strides)
//   cu_seqlens [B + 1] int64                   sequence b owns tokens [cu[b], cu[b + 1]) of T
//   -> out [T, H, D] bf16                      (transformers' attention output layout)
//
// Each sequence attends causally to itself only; query head h uses KV head h / (H / Hkv). Two phases:
//   1. pack, per (sequence, KV head), K into key blocks and V into key pairs, the layouts vdpbf16ps wants:
//        Kp [key block][D/2][16 keys][2]      lane j of a vector = key j . (q[2i], q[2i+1])
//        Vp [key pair][D][2]                  lane d of a vector = (v[2p][d], v[2p+1][d]) . (p0, p1)
//   2. per tile of R query rows (consecutive positions of one head): exact softmax over all visible keys
//        scores S [R, L] fp32 -> P = softmax(S) as bf16 pairs -> O [R, D] = P V   (fp32 accumulators)
// Scores and accumulators are fp32; only the probabilities are rounded to bf16 for the P V products.
// Where the CPU has a tile unit that Linux lets the process use, the same op runs on it instead (prefill_amx.h:
// tiles of 16 query rows, scores and P V as tile matmuls), unless set_prefill_amx(false) turned that off.
#include "kernels.h"
#include "prefill_amx.h"
#include "prefill_pack.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

namespace seesaw {

static std::atomic<bool> prefill_amx_on{true};

bool set_prefill_amx(bool enable) {
  prefill_amx_on = enable;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  return enable && amx_usable();
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
namespace {

constexpr int64_t R = 8;                  // query rows per tile: 2 R accumulators cover the dot products' latency

struct Packed {                           // where sequence b's packed K/V of KV head h start
  std::vector<int64_t> key_off, pair_off; // [B]: offsets in tokens (multiples of 16 / 2) into Kp / Vp
  int64_t key_tokens = 0, pair_tokens = 0;
};

// S[r, 16 kb + j] = scale * q_r . k_(16 kb + j) for key blocks [0, nkb); two blocks per pass
void score_tile(const int32_t* const* q32, const bf16* kp, int64_t nkb, int64_t D, float scale, float* S,
                int64_t ld) {
  const int64_t pairs = D / 2;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t kb = 0; kb < nkb; kb += 2) {
    const bool two = kb + 1 < nkb;
    const __m512i* k0 = reinterpret_cast<const __m512i*>(kp + kb * pairs * 32);
    const __m512i* k1 = two ? k0 + pairs : k0;
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; ++i) {
      const __m512i x0 = _mm512_loadu_si512(k0 + i), x1 = _mm512_loadu_si512(k1 + i);
      for (int r = 0; r < R; ++r) {
        const __m512i qb = _mm512_set1_epi32(q32[r][i]);
        a0[r] = _mm512_dpbf16_ps(a0[r], as_bh(qb), as_bh(x0));
        a1[r] = _mm512_dpbf16_ps(a1[r], as_bh(qb), as_bh(x1));
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(S + r * ld + kb * 16, _mm512_mul_ps(a0[r], vscale));
      if (two) _mm512_storeu_ps(S + r * ld + (kb + 1) * 16, _mm512_mul_ps(a1[r], vscale));
    }
  }
}

// O[r, :] = sum_p (P[r, 2p], P[r, 2p+1]) . (v_2p, v_2p+1) for C = D / 16 vectors per row, RR rows
template <int C, int RR>
void value_tile(const int32_t* const* p32, const bf16* vp, int64_t npairs, float* O) {
  __m512 acc[RR][C];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    const __m512i* v = reinterpret_cast<const __m512i*>(vp + p * C * 32);
    __m512i x[C];
    for (int c = 0; c < C; ++c) x[c] = _mm512_loadu_si512(v + c);
    for (int r = 0; r < RR; ++r) {
      const __m512i pb = _mm512_set1_epi32(p32[r][p]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pb), as_bh(x[c]));
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + (r * C + c) * 16, acc[r][c]);
}

template <int C>
void value_rows(const int32_t* const* p32, const bf16* vp, int64_t npairs, float* O) {
  constexpr int RR = C >= 8 ? 2 : 4;      // RR * C accumulators + C values fit in 32 registers
  for (int r = 0; r < R; r += RR) value_tile<C, RR>(p32 + r, vp, npairs, O + r * C * 16);
}

}  // namespace

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens,
                                double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(), "q must be [H, T, D], k and v [Hkv, T, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16, "prefill_attention takes bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "the head dim must be contiguous");
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = k.size(0);
  TORCH_CHECK(k.size(1) == T && k.size(2) == D, "k/v must be [Hkv, T=", T, ", D=", D, "]");
  TORCH_CHECK(H % Hkv == 0, "query heads (", H, ") not a multiple of KV heads (", Hkv, ")");
  TORCH_CHECK(D == 64 || D == 128, "prefill_attention supports head_dim 64 and 128, got ", D);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kLong, "cu_seqlens must be int64 [B + 1]");
  auto cu_t = cu_seqlens.contiguous();
  const int64_t* cu = cu_t.data_ptr<int64_t>();
  const int64_t B = cu_t.numel() - 1;
  TORCH_CHECK(B >= 1 && cu[0] == 0 && cu[B] == T, "cu_seqlens must run from 0 to T=", T);
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(cu[b + 1] >= cu[b], "cu_seqlens must be non-decreasing");
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (prefill_amx_on && amx_usable()) return prefill_attention_amx(q, k, v, cu, B, static_cast<float>(scale));
#endif

  const int64_t G = H / Hkv;
  const bf16 *qd = q.data_ptr<bf16>(), *kd = k.data_ptr<bf16>(), *vd = v.data_ptr<bf16>();
  const int64_t qs_h = q.stride(0), qs_t = q.stride(1), ks_h = k.stride(0), ks_t = k.stride(1);
  const int64_t vs_h = v.stride(0), vs_t = v.stride(1);

  // phase 1: pack K and V per (sequence, KV head)
  Packed pk;
  pk.key_off.resize(B);
  pk.pair_off.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    pk.key_off[b] = pk.key_tokens;
    pk.pair_off[b] = pk.pair_tokens;
    pk.key_tokens += round_up(n, 16);
    pk.pair_tokens += round_up(n, 2);
  }
  std::vector<bf16> kp(Hkv * pk.key_tokens * D), vp(Hkv * pk.pair_tokens * D);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, n = cu[b + 1] - cu[b];
      pack_keys(kd + h * ks_h + cu[b] * ks_t, ks_t, n, round_up(n, 16), D,
                kp.data() + (h * pk.key_tokens + pk.key_off[b]) * D);
      pack_values(vd + h * vs_h + cu[b] * vs_t, vs_t, n, round_up(n, 2), D,
                  vp.data() + (h * pk.pair_tokens + pk.pair_off[b]) * D);
    }
  });

  // phase 2: work items (sequence, query head, tile of R positions)
  std::vector<int64_t> item_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) item_start[b + 1] = item_start[b] + H * ((cu[b + 1] - cu[b] + R - 1) / R);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, cu[b + 1] - cu[b]);
  auto out = torch::empty({T, H, D}, q.options());
  bf16* od = out.data_ptr<bf16>();
  const float s = static_cast<float>(scale);

  at::parallel_for(0, item_start[B], 1, [&](int64_t begin, int64_t end) {
    const int64_t ld = round_up(longest, 32);
    std::vector<float> S(R * ld), O(R * D);
    std::vector<bf16> P(R * ld), qrows(R * D);
    const int32_t* q32[R];
    const int32_t* p32[R];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = std::upper_bound(item_start.begin(), item_start.end(), item) - item_start.begin() - 1;
      const int64_t n = cu[b + 1] - cu[b], tiles = (n + R - 1) / R;
      const int64_t local = item - item_start[b], head = local / tiles, p0 = (local % tiles) * R;
      const int64_t rows = std::min<int64_t>(R, n - p0), h = head / G;
      const int64_t visible = p0 + rows;                   // keys the tile's last row sees
      for (int r = 0; r < R; ++r) {                        // rows past the sequence repeat its last row
        const int64_t pos = cu[b] + p0 + std::min<int64_t>(r, rows - 1);
        std::memcpy(&qrows[r * D], qd + head * qs_h + pos * qs_t, D * sizeof(bf16));
        q32[r] = reinterpret_cast<const int32_t*>(&qrows[r * D]);
        p32[r] = reinterpret_cast<const int32_t*>(&P[r * ld]);
      }
      const int64_t nkb = (visible + 15) / 16;
      score_tile(q32, kp.data() + (h * pk.key_tokens + pk.key_off[b]) * D, nkb, D, s, S.data(), ld);
      const int64_t L = round_up(visible, 2);              // keys covered by the P V pass (pairs)
      for (int64_t r = 0; r < R; ++r) {
        float* row = &S[r * ld];
        const int64_t len = p0 + std::min<int64_t>(r, rows - 1) + 1;   // causal: keys [0, pos]
        const float inv = softmax_inplace(row, len);
        int64_t t = 0;
        for (; t + 16 <= len; t += 16)
          store_bf16x16(&P[r * ld + t], _mm512_mul_ps(_mm512_loadu_ps(row + t), _mm512_set1_ps(inv)));
        for (; t < len; ++t) P[r * ld + t] = bf16(row[t] * inv);
        for (; t < L; ++t) P[r * ld + t] = bf16(0.f);
      }
      const bf16* vph = vp.data() + (h * pk.pair_tokens + pk.pair_off[b]) * D;
      if (D == 64) value_rows<4>(p32, vph, L / 2, O.data());
      else value_rows<8>(p32, vph, L / 2, O.data());
      for (int64_t r = 0; r < rows; ++r) {
        bf16* dst = od + ((cu[b] + p0 + r) * H + head) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = bf16(O[r * D + d]);
      }
    }
  });
  return out;
}

bool has_prefill_attention() { return true; }

#else   // no AVX512-BF16: the caller uses torch's attention

torch::Tensor prefill_attention(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, double) {
  TORCH_CHECK(false, "prefill_attention was not compiled in (needs AVX512-BF16)");
}

bool has_prefill_attention() { return false; }

#endif

}  // namespace seesaw
