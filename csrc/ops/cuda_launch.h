// Shared by the CUDA entry points (csrc/ops/*cuda.cpp): binds a torch-free CUDA launcher to the
// current stream of the current device and checks the launch.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace pyseqk {
namespace ops {

template <auto Launcher>
struct OnStream {
  template <class... Args>
  void operator()(Args... args) const {
    Launcher(args..., at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace ops
}  // namespace pyseqk
