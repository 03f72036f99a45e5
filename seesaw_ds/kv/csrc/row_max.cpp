// Each row's first maximum of fp32 logits: the greedy token of a decode step.
//
//   x [B, V] fp32 -> (values [B] fp32, indices [B] int64), as torch's x.max(dim=-1)
//
// torch's max-with-index reduction carries the index through every lane comparison; at a decode step's
// batch x vocabulary (47 x 49152) that costs more than the LM head's matmul. Here a row is read twice: the
// maximum 16 lanes at a time, then the first lane equal to it. A row holding a NaN gives its first NaN, as
// torch does.
#include "kernels.h"
#include "vec.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>

namespace seesaw {
namespace {

void first_max(const float* row, int64_t n, float* value, int64_t* index) {
  int64_t t = 0;
  float m = -INFINITY;
  bool nan = false;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const __m512 v = _mm512_loadu_ps(row + t);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  m = _mm512_reduce_max_ps(vmax);
  nan = unordered != 0;
#endif
  for (; t < n; ++t) {
    nan = nan || std::isnan(row[t]);
    m = std::max(m, row[t]);
  }
  t = 0;
  if (nan) {
    while (!std::isnan(row[t])) ++t;
    *value = row[t];
    *index = t;
    return;
  }
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m);
  for (; t + kLanes <= n; t += kLanes) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + t), vm, _CMP_EQ_OQ);
    if (hit) {
      *value = m;
      *index = t + __builtin_ctz(hit);
      return;
    }
  }
#endif
  while (row[t] != m) ++t;
  *value = m;
  *index = t;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> row_max(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "row_max takes fp32 CPU logits [B, V], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "row_max needs at least one column");
  x = x.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  auto values = torch::empty({B}, x.options());
  auto indices = torch::empty({B}, x.options().dtype(at::kLong));
  const float* xd = x.data_ptr<float>();
  float* vd = values.data_ptr<float>();
  int64_t* id = indices.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) first_max(xd + b * V, V, vd + b, id + b);
  });
  return {values, indices};
}

}  // namespace seesaw
