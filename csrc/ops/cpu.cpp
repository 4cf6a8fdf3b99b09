// CPU implementations: the shared entry points bound to the kernels in csrc/cpu.
#include <c10/core/Device.h>

#include "cpu/blas.h"
#include "cpu/gemm.h"
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

  // The gate sums of fp32 batches of 12-48 rows go to the forward kernels transposed (StepSums
  // in pyseqk/cell_kernels.h), [G*H, B]:
  // - 24 <= B <= 32 on an AVX-512 build: the kernel computes them itself (cpu/gemm.h), each
  //   thread the rows of its units, fused with the gate math in one parallel loop. RNN/GRU/LSTM
  //   cell steps at B = 32, H = 256 took 44/113/145 us against 51/114/152 us through MKL
  //   (bench/NOTES.md, "Cells: one fused step"; the measured batch sweep set the range: below
  //   24 a vector of 16 batch lanes is mostly padding, above 32 the 3-vector blocks lost to MKL).
  // - Otherwise MKL computes them as W x^T: its x W^T with the weight as stored (the "TN" case)
  //   took 1.3-2.1x as long for 16 <= B <= 32 (bench/NOTES.md, "Cells: the gate GEMM
  //   transposed"), and the kernel moves them into place tile by tile.
  struct Staged {
    at::Tensor sums;
    cpu::StepSums desc;
  };
  static constexpr bool kTransposedSums = true;
  static constexpr int64_t kMinTransposedBatch = 12, kMaxTransposedBatch = 48;
  static constexpr int64_t kMinFusedBatch = 24;  // up to cpu::kGemmBatch
  static bool stage_sums(Staged& st, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b,
                         const at::Tensor& wb, bool stacked) {
    const int64_t B = a.size(0), Na = wa.size(0), Nb = stacked ? wb.size(0) : 0;
    if (a.scalar_type() != at::kFloat || !b.defined()) return false;
    const bool fused = cpu::kGemmFused && B >= kMinFusedBatch && B <= cpu::kGemmBatch &&
                       a.is_contiguous() && b.is_contiguous() && wa.is_contiguous() &&
                       wb.is_contiguous();
    if (!fused && (B < kMinTransposedBatch || B > kMaxTransposedBatch)) return false;
    const int64_t ld = fused ? cpu::kGemmBatch : B;
    st.sums = at::empty({Na + Nb, ld}, a.options());
    st.desc.sums = st.sums.data_ptr<float>();
    st.desc.ld = ld;
    if (fused) {
      st.desc.ready = false;
      st.desc.x = a.data_ptr<float>();
      st.desc.h = b.data_ptr<float>();
      st.desc.w_ih = wa.data_ptr<float>();
      st.desc.w_hh = wb.data_ptr<float>();
      st.desc.B = B;
      st.desc.I = a.size(1);
      return true;
    }
    // rows [r0, r0 + w.size(0)) of the sums (+)= w [N, K] x^T, straight into the BLAS (at::mm's
    // dispatch and checks cost a few microseconds a call, 2-5 % of a B = 32 step) where the
    // strides allow it.
    auto add = [&](int64_t r0, const at::Tensor& x, const at::Tensor& w, float beta) {
      const int64_t N = w.size(0), K = x.size(1);
      at::Tensor dst = st.sums.narrow(0, r0, N);
      if (x.stride(1) == 1 && w.stride(1) == 1 &&
          cpu::blas_fits({N, B, K, x.stride(0), w.stride(0)})) {
        cpu::blas_mm<float>(false, true, N, B, K, 1.f, w.data_ptr<float>(), w.stride(0),
                            x.data_ptr<float>(), x.stride(0), beta, dst.data_ptr<float>(), B);
      } else if (beta == 0.f) {
        at::mm_out(dst, w, x.t());
      } else {
        dst.addmm_(w, x.t());
      }
    };
    add(0, a, wa, 0.f);
    add(stacked ? Na : 0, b, wb, stacked ? 0.f : 1.f);
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Cells<CpuKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
