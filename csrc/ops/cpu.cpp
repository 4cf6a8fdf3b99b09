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
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Cells<CpuKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
