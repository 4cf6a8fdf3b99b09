// CPU implementations: the shared entry points bound to the kernels in csrc/cpu.
#include <c10/core/Device.h>

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
    at::mm_out(sums, wa, a.t());
    if (b.defined()) sums.addmm_(wb, b.t());
    cpu::transpose_f32(sums.data_ptr<float>(), B, out.data_ptr<float>(), out.stride(0), N, B);
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Cells<CpuKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
