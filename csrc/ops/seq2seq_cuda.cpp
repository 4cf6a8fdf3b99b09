// CUDA implementations of the seq2seq attention ops: the shared entry points (ops/seq2seq.h)
// bound to the kernels in csrc/cuda/seq2seq.cu, launched on the current stream under a device
// guard, every launch checked. Compiled only into the CUDA build.
#ifdef PYSEQK_WITH_CUDA

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda_launch.h"

#include "ops/seq2seq.h"

namespace pyseqk {
namespace ops {
namespace {

// The Bahdanau backward sums dv over query rows with atomicAdd: the order, and so the last bits,
// vary run to run, which torch.use_deterministic_algorithms(True) must hear about.
struct BahdanauBackwardOnStream {
  template <class... Args>
  void operator()(Args... args) const {
    at::globalContext().alertNotDeterministic(
        "pyseqk::bahdanau_attention_backward (CUDA; dv is summed with atomicAdd)");
    OnStream<&cuda::bahdanau_attention_backward>{}(args...);
  }
};

struct CudaSeq2seqKernels {
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  static constexpr bool kScratch = true;  // one block per query row keeps its scores in global memory
  static constexpr int64_t kMaxRows = 2147483647;  // CUDA grid dimension x
  static constexpr OnStream<&cuda::luong_attention_forward> luong_attention_forward{};
  static constexpr OnStream<&cuda::bahdanau_attention_forward> bahdanau_attention_forward{};
  static constexpr BahdanauBackwardOnStream bahdanau_attention_backward{};
};

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CUDA, m) { seq2seq::Ops<CudaSeq2seqKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk

#endif  // PYSEQK_WITH_CUDA
