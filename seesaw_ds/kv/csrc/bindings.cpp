#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &seesaw::paged_decode, "paged decode attention (CPU)");
  m.def("prefill_attention", &seesaw::prefill_attention, "causal prefill attention over packed sequences (CPU, bf16)");
  m.def("has_prefill_attention", &seesaw::has_prefill_attention, "prefill_attention was compiled in");
  m.def("set_prefill_amx", &seesaw::set_prefill_amx, "prefill_attention on the tile unit where usable (true) or not");
  m.def("rms_norm", &seesaw::rms_norm, "fused RMSNorm (CPU, bf16)");
  m.def("silu_mul", &seesaw::silu_mul, "fused silu(gate) * up (CPU, bf16)");
}
