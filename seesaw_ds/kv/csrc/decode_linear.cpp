// bf16 linear layers at decode's row counts (one to a few dozen rows): on the tile unit (AMX), else with
// AVX512-BF16 dot products (vdpbf16ps).
//
// A decode step's linears read every weight once for a handful of rows: the step is bound by streaming the
// weights from memory, and what matters is that each weight byte is read once, at the memory's rate, while
// the arithmetic keeps up. The weight is packed once into 16-column panels of bf16 pairs,
//
//   packed [N/16, K/2, 16, 2]:  packed[p][kk][j][e] = w[16p + j][2kk + e]      (w [N, K], N padded to 16)
//
// AMX: 16 consecutive pairs of a panel are one B tile (16 rows of 64 bytes) and up to 16 rows of x one A
// tile (32 inputs each). AVX512-BF16: one pair of a panel is one vector (16 columns x 2 inputs), times a
// broadcast pair of one row of x, for 6 rows x 4 panels at a time (24 accumulators: enough dot products in
// flight to cover their latency). Either way a block of up to 4 panels (64 output columns) runs over all of K
// for a group of rows at a time: its panels stream from memory for the first group and from L2 for the rest.
// Threads split the blocks, so each weight byte is read from memory by one thread. Accumulation is in fp32,
// the bias added in fp32, the result rounded to bf16 once (as oneDNN's bf16 linear does; the order of the
// sums differs, so low bits may).
#include "kernels.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <array>
#include <cstring>

#include "decode_amx.h"

namespace seesaw {

#if defined(__AVX512BF16__)
namespace {
using bf16 = c10::BFloat16;
constexpr int64_t kPanel = 16;     // output columns per panel (one vector; one C tile's width)
constexpr int64_t kBlock = 4;      // panels per block (64 output columns): a thread's unit of work
constexpr int64_t kDepth = 32;     // the input width is a multiple of this (one A tile row)

struct LinearArgs {                // one call: x [M, K] . packed [P, K/2, 16, 2] -> out [M, N] (+ bias [N])
  const bf16 *x, *w, *bias;
  bf16* out;
  int64_t M, K, N, panels;
};

// rows [0, rows) of panel p of a block starting `columns` before the end: sums (+ bias) rounded to bf16 once
template <typename Sum>
inline void store_panel(const bf16* bias, bf16* out, int64_t ldo, int64_t rows, int p, int64_t columns, Sum sum) {
  const int64_t valid = std::min<int64_t>(kPanel, columns - p * kPanel);
  if (valid <= 0) return;
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  const __m512 bv = bias ? _mm512_maskz_cvtpbh_ps(mask, (__m256bh)_mm256_maskz_loadu_epi16(mask, bias + p * kPanel))
                         : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sum(r), bv));
    _mm256_mask_storeu_epi16(out + r * ldo + p * kPanel, mask, v);
  }
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
constexpr int64_t kTileRows = 16;  // rows of x per A tile

// Tiles: 0 = A [mr, 32 bf16], 1 and 2 = B [16 pairs, 16 columns] (alternating, so a load overlaps the
// previous product), 4 .. 7 = C [mr, 16 fp32].
struct alignas(64) LinearTiles {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  explicit LinearTiles(int64_t mr) {
    for (int t : {0, 4, 5, 6, 7}) colsb[t] = 64, rows[t] = static_cast<uint8_t>(mr);
    for (int t : {1, 2}) colsb[t] = 64, rows[t] = 16;
  }
};

// the tile intrinsics take literal tile numbers
#define SEESAW_PANEL_PRODUCT(C, B, ptr) \
  do {                                  \
    _tile_loadd(B, ptr, 64);            \
    _tile_dpbf16ps(C, 0, B);            \
  } while (0)

// out [mr, columns of this block] = x [mr, K] . panels^T (+ bias); NB panels, rows ldx / ldo apart
template <int NB>
void tile_block(const bf16* x, int64_t ldx, int64_t mr, const bf16* panels, int64_t half_k, const bf16* bias,
                bf16* out, int64_t ldo, int64_t columns) {
  const int64_t panel_stride = half_k * 2 * kPanel;
  _tile_zero(4);
  if constexpr (NB > 1) _tile_zero(5);
  if constexpr (NB > 2) _tile_zero(6);
  if constexpr (NB > 3) _tile_zero(7);
  for (int64_t k0 = 0; k0 < 2 * half_k; k0 += kDepth) {
    _tile_loadd(0, x + k0, ldx * sizeof(bf16));
    const bf16* b = panels + k0 * kPanel;              // pairs k0/2 .. k0/2 + 15 of panel 0
    SEESAW_PANEL_PRODUCT(4, 1, b);
    if constexpr (NB > 1) SEESAW_PANEL_PRODUCT(5, 2, b + panel_stride);
    if constexpr (NB > 2) SEESAW_PANEL_PRODUCT(6, 1, b + 2 * panel_stride);
    if constexpr (NB > 3) SEESAW_PANEL_PRODUCT(7, 2, b + 3 * panel_stride);
  }
  alignas(64) float sums[kBlock][kTileRows * kPanel];
  _tile_stored(4, sums[0], 64);
  if constexpr (NB > 1) _tile_stored(5, sums[1], 64);
  if constexpr (NB > 2) _tile_stored(6, sums[2], 64);
  if constexpr (NB > 3) _tile_stored(7, sums[3], 64);
  for (int p = 0; p < NB; ++p)
    store_panel(bias, out, ldo, mr, p, columns, [&](int64_t r) { return _mm512_load_ps(sums[p] + r * kPanel); });
}
#undef SEESAW_PANEL_PRODUCT

using TileFn = void (*)(const bf16*, int64_t, int64_t, const bf16*, int64_t, const bf16*, bf16*, int64_t, int64_t);
constexpr TileFn kTileBlocks[kBlock] = {&tile_block<1>, &tile_block<2>, &tile_block<3>, &tile_block<4>};

void tile_blocks(const LinearArgs& a, int64_t begin, int64_t end) {
  const int64_t half_k = a.K / 2;
  int64_t configured = 0;                                  // the tile configuration is per thread
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t p0 = blk * kBlock, nb = std::min<int64_t>(kBlock, a.panels - p0), c0 = p0 * kPanel;
    for (int64_t r0 = 0; r0 < a.M; r0 += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, a.M - r0);
      if (mr != configured) {
        const LinearTiles config(mr);
        _tile_loadconfig(&config);
        configured = mr;
      }
      kTileBlocks[nb - 1](a.x + r0 * a.K, a.K, mr, a.w + p0 * half_k * 2 * kPanel, half_k,
                          a.bias ? a.bias + c0 : nullptr, a.out + r0 * a.N + c0, a.N, a.N - c0);
    }
  }
  if (configured) _tile_release();
}
#endif

constexpr int64_t kVecRows = 6;    // rows per pass of the AVX512-BF16 path: 6 x 4 accumulators
// How far ahead (input pairs, one 64-byte line per panel each) the first row group prefetches its panels, into
// L2. A block's four panels are short streams (K / 2 lines each) that the hardware prefetcher picks up late;
// with a few rows the pass is quick enough to wait on memory without this. One row streams well without it.
// Into L2 rather than L1 (kDecodeHint), as decode attention's passes (decode_bf16.h): L1's miss buffers are few.
constexpr int64_t kPrefetchPairs = 32;   // (a prefetch past the weight's end is a hint: it never faults)

// out [MR, NB * 16 columns] = x [MR, K] . NB panels^T (+ bias): every pair of inputs, broadcast, times the
// panels' 16 column pairs, accumulated in fp32; rows ldx / ldo apart
template <int MR, int NB, bool Prefetch>
void vec_block(const bf16* x, int64_t ldx, const bf16* panels, int64_t half_k, const bf16* bias, bf16* out,
               int64_t ldo, int64_t columns) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NB; ++p) acc[r][p] = _mm512_setzero_ps();
  const int64_t panel_stride = half_k * 2 * kPanel;
  for (int64_t kk = 0; kk < half_k; ++kk) {
    __m512bh b[NB];
    if constexpr (Prefetch)
      for (int p = 0; p < NB; ++p)
        prefetch_row<kDecodeHint>(panels + p * panel_stride + (kk + kPrefetchPairs) * 2 * kPanel, 64);
    for (int p = 0; p < NB; ++p) b[p] = (__m512bh)_mm512_loadu_si512(panels + p * panel_stride + kk * 2 * kPanel);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * kk, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < NB; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
    }
  }
  for (int p = 0; p < NB; ++p) store_panel(bias, out, ldo, MR, p, columns, [&](int64_t r) { return acc[r][p]; });
}

using VecFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, const bf16*, bf16*, int64_t, int64_t);
template <int MR, bool Prefetch>
constexpr std::array<VecFn, kBlock> vec_row_blocks() {
  return {&vec_block<MR, 1, Prefetch>, &vec_block<MR, 2, Prefetch>, &vec_block<MR, 3, Prefetch>,
          &vec_block<MR, 4, Prefetch>};
}
// [prefetch][rows - 1][panels - 1]
const std::array<std::array<std::array<VecFn, kBlock>, kVecRows>, 2> kVecBlocks = {{
    {vec_row_blocks<1, false>(), vec_row_blocks<2, false>(), vec_row_blocks<3, false>(), vec_row_blocks<4, false>(),
     vec_row_blocks<5, false>(), vec_row_blocks<6, false>()},
    {vec_row_blocks<1, false>(), vec_row_blocks<2, true>(), vec_row_blocks<3, true>(), vec_row_blocks<4, true>(),
     vec_row_blocks<5, true>(), vec_row_blocks<6, true>()}}};

void vec_blocks(const LinearArgs& a, int64_t begin, int64_t end) {
  const int64_t half_k = a.K / 2;
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t p0 = blk * kBlock, nb = std::min<int64_t>(kBlock, a.panels - p0), c0 = p0 * kPanel;
    for (int64_t r0 = 0; r0 < a.M; r0 += kVecRows) {
      const int64_t mr = std::min<int64_t>(kVecRows, a.M - r0);
      kVecBlocks[r0 == 0][mr - 1][nb - 1](a.x + r0 * a.K, a.K, a.w + p0 * half_k * 2 * kPanel, half_k,
                                          a.bias ? a.bias + c0 : nullptr, a.out + r0 * a.N + c0, a.N, a.N - c0);
    }
  }
}
}  // namespace

bool has_linear_packed() { return true; }

torch::Tensor pack_linear(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_linear takes a 2-D bfloat16 weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % kDepth == 0, "pack_linear: the input width must be a multiple of ", kDepth, ", got ", K);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // [P * 16, K] -> [P, 16, K/2, 2] -> [P, K/2, 16, 2]
  return padded.view({panels, kPanel, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor linear_packed(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16, "linear_packed takes bfloat16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2, "linear_packed: not a packed weight");
  const int64_t K = 2 * packed.size(1), panels = packed.size(0);
  TORCH_CHECK(x.size(-1) == K, "linear_packed: input width ", x.size(-1), " != ", K);
  TORCH_CHECK(N > (panels - 1) * kPanel && N <= panels * kPanel, "linear_packed: ", N, " columns for ", panels, " panels");
  auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, xc.options());
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kBFloat16 && bc.numel() == N, "linear_packed: bias must be bf16 [", N, "]");
  }
  const LinearArgs args{xc.data_ptr<bf16>(), packed.data_ptr<bf16>(), bc.defined() ? bc.data_ptr<bf16>() : nullptr,
                        out.data_ptr<bf16>(), xc.numel() / K, K, N, panels};
  at::parallel_for(0, (panels + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (amx_usable()) return tile_blocks(args, begin, end);      // asked of Linux once per process
#endif
    vec_blocks(args, begin, end);
  });
  return out;
}

#else   // no AVX512-BF16: decode keeps oneDNN's linear

bool has_linear_packed() { return false; }
torch::Tensor pack_linear(torch::Tensor) { TORCH_CHECK(false, "pack_linear was not compiled in (needs AVX512-BF16)"); }
torch::Tensor linear_packed(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t) {
  TORCH_CHECK(false, "linear_packed was not compiled in (needs AVX512-BF16)");
}

#endif

}  // namespace seesaw
