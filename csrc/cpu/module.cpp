// ┌────────────────────────────────────────────────────────────────────────────────────────────┐
// │ vqkernels._C: registers the C++ CPU kernels for the schemas defined in vqkernels/_ops.py.  │
// │ The schemas are NOT defined here (one definition, in Python, imported before this module); │
// │ TORCH_LIBRARY_IMPL only attaches CPU kernels to them.  The Python module itself exposes    │
// │ `cpu_isa()` / `best_cpu_isa()` (which SIMD kernel runs) for `python -m vqkernels`.         │
// └────────────────────────────────────────────────────────────────────────────────────────────┘
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/common.h"

namespace vc = vqkernels::cpu;

TORCH_LIBRARY_IMPL(vqkernels, CPU, m) {
  m.impl("nearest_code", &vc::nearest_code);
  m.impl("cluster_stats", &vc::cluster_stats);
  m.impl("ema_update_", &vc::ema_update_);
  m.impl("quantize", &vc::quantize);
  m.impl("quantize_backward", &vc::quantize_backward);
  m.impl("code_distribution", &vc::code_distribution);
  m.impl("code_distribution_backward", &vc::code_distribution_backward);
  m.impl("soft_quantize", &vc::soft_quantize);
  m.impl("soft_quantize_backward", &vc::soft_quantize_backward);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqkernels C++ CPU kernels (registered as torch.ops.vqkernels.* for CPU tensors)";
  m.def(
      "cpu_isa", [] { return std::string(vc::isa_name(vc::active_isa())); },
      "SIMD kernel the CPU backend uses now: 'avx512', 'avx2' or 'scalar' (the best the CPU "
      "supports, capped by VQKERNELS_CPU_ISA).");
  m.def(
      "best_cpu_isa", [] { return std::string(vc::isa_name(vc::best_isa())); },
      "Best SIMD kernel this CPU supports.");
}
