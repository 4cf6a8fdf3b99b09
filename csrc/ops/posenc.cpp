// Schemas of the positional-encoding ops and their CPU implementation.
#include <torch/library.h>

#include "ops/posenc.h"

namespace pyseqk {
namespace ops {
namespace {

struct CpuPosEnc {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static constexpr auto forward = &cpu::positional_encoding_forward;
  static constexpr auto backward = &cpu::positional_encoding_backward;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyseqk, m) {
  // out = dropout(x + pe[t]) with the sinusoid computed in the kernel and the dropout mask a
  // hash of (seed, element index) (csrc/include/pyseqk/posenc.h). x: [T, B, D], [B, T, D]
  // (batch_first) or [T, D].
  m.def("positional_encoding(Tensor x, float dropout_p, int seed, bool batch_first) -> Tensor");
  // grad_x = grad * keep / (1 - dropout_p), the mask recomputed from the seed.
  m.def("positional_encoding_backward(Tensor grad, float dropout_p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { PosEnc<CpuPosEnc>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
