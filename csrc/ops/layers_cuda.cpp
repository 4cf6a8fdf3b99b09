// CUDA implementations of the layer ops: the shared time loop of layers.h with cuBLAS GEMMs
// (through ATen, on the current stream) and the per-step kernels of csrc/cuda/layers.cu,
// launched on the current stream under a device guard, every launch checked. Compiled only
// into the CUDA build.
#ifdef PYSEQK_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_launch.h"

#include "ops/layers.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace ops {
namespace {

struct CudaLayerKernels {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  struct Weight {
    Weight(const at::Tensor& w, int64_t) : w(w) {}
    at::Tensor w;  // [K, N] contiguous or undefined
  };
  static at::Tensor transposed(const at::Tensor& w) { return w.t().contiguous(); }
  // cuBLAS through ATen, on the current stream.
  static void step_gemm(const Weight& w, int64_t M, const void* A, int64_t lda, double beta,
                        void* C, int64_t ldc) {
    aten_gemm(w.w.options(), false, false, M, w.w.size(1), w.w.size(0), A, lda, w.w.data_ptr(),
              w.w.size(1), beta, C, ldc);
  }
  template <class GemmOf, class Point>
  static void time_loop(const Weight& w, int64_t T, int64_t, int64_t H, int, const GemmOf& gemm_of,
                        const Point& point) {
    serial_time_loop(&step_gemm, w, T, H, gemm_of, point);
  }
  // No whole-layer forward of its own (layers.h's fused_fits path is the CPU's).
  static constexpr bool kFusedLayer = false;
  static void fused_forward(const cpu::FusedLayer&) {}
  // The serial loop always asks for all units: the unit range is the whole row.
  template <class... A>
  static void lstm_forward_units(int64_t, int64_t, A... a) { lstm_forward_step(a...); }
  template <class... A>
  static void gru_forward_units(int64_t, int64_t, A... a) { gru_forward_step(a...); }
  template <class... A>
  static void rnn_forward_units(int64_t, int64_t, A... a) { rnn_forward_step(a...); }
  static constexpr OnStream<&cuda::lstm_layer_forward_step> lstm_forward_step{};
  static constexpr OnStream<&cuda::lstm_layer_backward_step> lstm_backward_step{};
  static constexpr OnStream<&cuda::layer_select_step> select_step{};
  static constexpr OnStream<&cuda::layer_grad_step> grad_step{};
  static constexpr OnStream<&cuda::gru_layer_forward_step> gru_forward_step{};
  static constexpr OnStream<&cuda::gru_layer_backward_step> gru_backward_step{};
  static constexpr OnStream<&cuda::rnn_layer_forward_step> rnn_forward_step{};
  static constexpr OnStream<&cuda::rnn_layer_backward_step> rnn_backward_step{};
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CUDA, m) { Layers<CudaLayerKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk

#endif  // PYSEQK_WITH_CUDA
