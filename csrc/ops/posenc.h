// at::Tensor entry points of the positional-encoding ops, written once for every device: `K`
// supplies the kernels (csrc/cpu/posenc.cpp or csrc/cuda/posenc.cu) and a device guard.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "pyseqk/posenc.h"

namespace pyseqk {
namespace ops {

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "pyseqk: dropout_p must be in [0, 1], got ", p);
}

template <class K>
struct PosEnc {
  // x: [T, B, D], [B, T, D] (batch_first) or unbatched [T, D].
  static at::Tensor forward(const at::Tensor& x, double dropout_p, int64_t seed, bool batch_first) {
    const DType dtype = to_dtype(x, "x");
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "pyseqk: x must be 3-D [seq, batch, d_model] ",
                "([batch, seq, d_model] with batch_first) or 2-D [seq, d_model], got shape ",
                x.sizes());
    check_dropout_p(dropout_p);
    const bool time_second = x.dim() == 3 && batch_first;
    const int64_t T = x.size(time_second ? 1 : 0);
    const int64_t R = x.dim() == 3 && !batch_first ? x.size(1) : 1;
    const int64_t D = x.size(-1);
    typename K::Guard guard(x);
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc);
    K::forward(dtype, xc.data_ptr(), out.data_ptr(), xc.numel(), T, R, D, dropout_p,
               static_cast<uint32_t>(seed));
    return out;
  }

  static at::Tensor backward(const at::Tensor& grad, double dropout_p, int64_t seed) {
    const DType dtype = to_dtype(grad, "grad");
    check_dropout_p(dropout_p);
    typename K::Guard guard(grad);
    const at::Tensor gc = grad.contiguous();
    at::Tensor grad_x = at::empty_like(gc);
    K::backward(dtype, gc.data_ptr(), grad_x.data_ptr(), gc.numel(), dropout_p,
                static_cast<uint32_t>(seed));
    return grad_x;
  }

  static void register_impls(torch::Library& m) {
    m.impl("positional_encoding", &forward);
    m.impl("positional_encoding_backward", &backward);
  }
};

}  // namespace ops
}  // namespace pyseqk
