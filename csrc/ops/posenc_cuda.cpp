// CUDA implementation of the positional-encoding ops: the kernels of csrc/cuda/posenc.cu on the
// current stream of the input's device. Compiled only into the CUDA build.
#ifdef PYSEQK_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/posenc.h"

namespace pyseqk {
namespace ops {
namespace {

struct CudaPosEnc {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  template <class... Args>
  static void forward(Args... args) {
    cuda::positional_encoding_forward(args..., at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class... Args>
  static void backward(Args... args) {
    cuda::positional_encoding_backward(args..., at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CUDA, m) { PosEnc<CudaPosEnc>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk

#endif  // PYSEQK_WITH_CUDA
