// CUDA implementations: the shared entry points bound to the kernels in csrc/cuda, launched on
// the current stream under a device guard. Compiled only into the CUDA build.
#ifdef PYSEQK_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_launch.h"

#include "ops/cells.h"
#include "pyseqk/cell_kernels.h"

namespace pyseqk {
namespace ops {
namespace {

struct CudaKernels {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  static constexpr OnStream<&cuda::lstm_cell_forward> lstm_cell_forward{};
  static constexpr OnStream<&cuda::lstm_cell_backward> lstm_cell_backward{};
  static constexpr OnStream<&cuda::gru_cell_forward> gru_cell_forward{};
  static constexpr OnStream<&cuda::gru_cell_backward> gru_cell_backward{};
  static constexpr OnStream<&cuda::rnn_cell_forward> rnn_cell_forward{};
  static constexpr OnStream<&cuda::rnn_cell_backward> rnn_cell_backward{};
  // cuBLAS for every batch size.
  static constexpr int64_t kMaxSmallBatch = 0;
  static bool small_batch_gates(DType, const void*, const void*, int64_t, const void*, const void*,
                                int64_t, void*, int64_t, int64_t, int64_t) {
    return false;
  }
  // The gate sums always land in ws (cell_gate_sums in ops/cells.h).
  static constexpr bool kTransposedSums = false;
  struct Staged {};
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CUDA, m) { Cells<CudaKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk

#endif  // PYSEQK_WITH_CUDA
