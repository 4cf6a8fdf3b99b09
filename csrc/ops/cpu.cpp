// CPU implementations: the shared entry points bound to the kernels in csrc/cpu.
#include <c10/core/Device.h>

#include "ops/cells.h"
#include "ops/packed_weights.h"
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

  static bool packed_gates(at::Tensor& out, const at::Tensor& a, const at::Tensor& wa,
                           const at::Tensor& b, const at::Tensor& wb) {
    if (a.scalar_type() != at::kFloat || !a.is_contiguous() || out.stride(1) != 1 ||
        (b.defined() && !b.is_contiguous())) {
      return false;
    }
    static PackedWeightCache cache;
    const at::Tensor packed = cache.get(wa, wb);
    if (!packed.defined()) return false;
    cpu::packed_gemm(a.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                     a.size(0), packed.const_data_ptr<float>(), wa.size(0), a.size(1),
                     b.defined() ? b.size(1) : 0, out.data_ptr<float>(), out.stride(0));
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Cells<CpuKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
