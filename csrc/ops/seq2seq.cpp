// The seq2seq attention ops: schemas (a fragment of the pyseqk library) and the CPU
// implementations; the CUDA ones register in seq2seq_cuda.cpp.
#include <torch/library.h>

#include <cstdint>

#include "ops/seq2seq.h"

namespace pyseqk {
namespace ops {
namespace {

struct CpuSeq2seqKernels {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static constexpr bool kScratch = false;
  static constexpr int64_t kMaxRows = INT64_MAX;
  static constexpr auto luong_attention_forward = &cpu::luong_attention_forward;
  static constexpr auto bahdanau_attention_forward = &cpu::bahdanau_attention_forward;
  static constexpr auto bahdanau_attention_backward = &cpu::bahdanau_attention_backward;
};

}  // namespace

// Luong takes the dot form: "general" attention is dot attention on query @ W, one GEMM that the
// caller (pyseqk.functional / pyseqk.nn.LuongAttention) runs first. Bahdanau takes the
// projections wq = Wa(query) and uk = Ua(keys) (GEMMs outside the kernel) and v = Va.weight.
// key_padding_mask: bool [B, Tk], True = padding. The backward ops take the forward's weights.
TORCH_LIBRARY_FRAGMENT(pyseqk, m) {
  m.def(
      "luong_attention(Tensor query, Tensor keys, Tensor values, Tensor? key_padding_mask) "
      "-> (Tensor context, Tensor weights)");
  m.def(
      "luong_attention_backward(Tensor? grad_context, Tensor? grad_weights, Tensor query, "
      "Tensor keys, Tensor values, Tensor weights) -> (Tensor grad_query, Tensor grad_keys, "
      "Tensor grad_values)");
  m.def(
      "bahdanau_attention(Tensor wq, Tensor uk, Tensor v, Tensor values, "
      "Tensor? key_padding_mask) -> (Tensor context, Tensor weights)");
  m.def(
      "bahdanau_attention_backward(Tensor? grad_context, Tensor? grad_weights, Tensor wq, "
      "Tensor uk, Tensor v, Tensor values, Tensor weights) -> (Tensor grad_wq, Tensor grad_uk, "
      "Tensor grad_v, Tensor grad_values)");
}

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { seq2seq::Ops<CpuSeq2seqKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
