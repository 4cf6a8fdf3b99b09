// CPU implementations: the shared entry points bound to the kernels in csrc/cpu.
#include <c10/core/Device.h>

#include "cpu/blas.h"
#include "ops/cells.h"
#include "pyseqk/cell_kernels.h"

namespace pyseqk {
namespace ops {
namespace {

struct CpuKernels {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static constexpr auto lstm_cell_forward = &cpu::lstm_cell_forward;
  static constexpr auto lstm_cell_backward = &cpu::lstm_cell_backward;
  static constexpr auto gru_cell_forward = &cpu::gru_cell_forward;
  static constexpr auto gru_cell_backward = &cpu::gru_cell_backward;
  static constexpr auto rnn_cell_forward = &cpu::rnn_cell_forward;
  static constexpr auto rnn_cell_backward = &cpu::rnn_cell_backward;
  static constexpr int64_t kMaxSmallBatch = cpu::kMaxSmallBatch;
  static constexpr auto small_batch_gates = &cpu::small_batch_gates;

  // MKL's sgemm is slow on x W^T with the weight as stored (W [N, K] row-major, the "TN" case)
  // for mid-size batches: 2 threads on an AVX-512 Xeon, N = 4H, H = 128-512, it took 1.3-2.1x as
  // long as W x^T for 16 <= B <= 32, about the same from B = 64, and less at B <= 8
  // (bench/NOTES.md, "Cells: the gate GEMM transposed"). Those batches get the gate sums as
  // [N, B] and transpose them into place (a few microseconds).
  static constexpr int64_t kMinTransposedBatch = 12, kMaxTransposedBatch = 48;
  static bool transposed_gate_sums(at::Tensor& out, const at::Tensor& a, const at::Tensor& wa,
                                   const at::Tensor& b, const at::Tensor& wb) {
    const int64_t B = a.size(0), N = wa.size(0);
    if (a.scalar_type() != at::kFloat || B < kMinTransposedBatch || B > kMaxTransposedBatch ||
        out.stride(1) != 1) {
      return false;
    }
    at::Tensor sums = at::empty({N, B}, a.options());
    // sums [N, B] (+)= w [N, K] x^T, straight into the BLAS (at::mm's dispatch and checks cost a
    // few microseconds a call, 2-5 % of a B = 32 step) where the strides allow it.
    auto add = [&](const at::Tensor& x, const at::Tensor& w, float beta) {
      const int64_t K = x.size(1);
      if (x.stride(1) == 1 && w.stride(1) == 1 &&
          cpu::blas_fits({N, B, K, x.stride(0), w.stride(0)})) {
        cpu::blas_mm<float>(false, true, N, B, K, 1.f, w.data_ptr<float>(), w.stride(0),
                            x.data_ptr<float>(), x.stride(0), beta, sums.data_ptr<float>(), B);
      } else if (beta == 0.f) {
        at::mm_out(sums, w, x.t());
      } else {
        sums.addmm_(w, x.t());
      }
    };
    add(a, wa, 0.f);
    if (b.defined()) add(b, wb, 1.f);
    cpu::transpose_f32(sums.data_ptr<float>(), B, out.data_ptr<float>(), out.stride(0), N, B);
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Cells<CpuKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
