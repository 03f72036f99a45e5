#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &seesaw::paged_decode, "paged decode attention (CPU)");
  m.def("prefill_attention", &seesaw::prefill_attention, "causal prefill attention over packed sequences (CPU, bf16)");
  m.def("has_prefill_attention", &seesaw::has_prefill_attention, "prefill_attention was compiled in");
  m.def("set_prefill_amx", &seesaw::set_prefill_amx, "prefill_attention on the tile unit where usable (true) or not");
  m.def("rms_norm", &seesaw::rms_norm, "fused RMSNorm (CPU, bf16)");
  m.def("silu_mul", &seesaw::silu_mul, "fused silu(gate) * up (CPU, bf16)");
  m.def("rope", &seesaw::rope, "rotary embedding of a prefill's q or k [B, H, T, D] (CPU, bf16)");
  m.def("rope_kv_write", &seesaw::rope_kv_write, "rotary embedding of a decode step's q and k, k and v to the cache");
  m.def("pack_linear", &seesaw::pack_linear, "pack a bf16 weight [N, K] for linear_packed");
  m.def("linear_packed", &seesaw::linear_packed, "bf16 linear over a packed weight (x, packed, bias or None, N)");
  m.def("row_max", &seesaw::row_max, "each row's first maximum of fp32 logits (values, indices)");
  m.def("has_linear_packed", &seesaw::has_linear_packed, "linear_packed was compiled in");
}
