// The operand layouts both prefill paths read (prefill_attention.cpp on AVX512-BF16, prefill_amx.h on the tile
// unit), packed once per (sequence, KV head) from rows of D bf16:
//   Kp [key block][D / 2][16 keys][2]   bf16 pairs (k[2i], k[2i + 1]) of 16 consecutive keys
//   Vp [key pair][D][2]                 bf16 pairs (v[2p][d], v[2p + 1][d]) of 2 consecutive keys
// Keys past the sequence's n are zero up to the `padded` count the caller's tiles cover.
#pragma once
#include "kernels.h"

namespace seesaw {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// k rows [n, D] (t_stride elements apart) -> kp: padded / 16 key blocks (padded a multiple of 16)
inline void pack_keys(const c10::BFloat16* k, int64_t t_stride, int64_t n, int64_t padded, int64_t D,
                      c10::BFloat16* kp) {
  const c10::BFloat16 zero(0.f);
  for (int64_t kb = 0; kb < padded / 16; ++kb)
    for (int64_t i = 0; i < D / 2; ++i)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = kb * 16 + j;
        c10::BFloat16* dst = kp + ((kb * (D / 2) + i) * 16 + j) * 2;
        dst[0] = key < n ? k[key * t_stride + 2 * i] : zero;
        dst[1] = key < n ? k[key * t_stride + 2 * i + 1] : zero;
      }
}

// v rows [n, D] (t_stride elements apart) -> vp: padded / 2 key pairs (padded even)
inline void pack_values(const c10::BFloat16* v, int64_t t_stride, int64_t n, int64_t padded, int64_t D,
                        c10::BFloat16* vp) {
  const c10::BFloat16 zero(0.f);
  for (int64_t p = 0; p < padded / 2; ++p)
    for (int64_t d = 0; d < D; ++d) {
      vp[(p * D + d) * 2] = 2 * p < n ? v[2 * p * t_stride + d] : zero;
      vp[(p * D + d) * 2 + 1] = 2 * p + 1 < n ? v[(2 * p + 1) * t_stride + d] : zero;
    }
}

}  // namespace seesaw
