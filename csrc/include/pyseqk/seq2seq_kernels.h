// Launcher declarations of the fused seq2seq attention kernels (Luong dot, Bahdanau additive):
// the CPU versions (csrc/cpu/seq2seq.cpp) and the CUDA versions (csrc/cuda/seq2seq.cu) take the
// same arguments. Torch-free.
//
// All tensors are contiguous, row-major; B = batch, Tq = query steps, Tk = key steps,
// D = score width (hidden size H for Luong, attention units U for Bahdanau), Hv = value width.
// "T" is the kernel's dtype; "Acc" is its math type (float for float16/bfloat16/float32, double
// for float64): backward outputs are written in Acc so that sums over many rows stay exact-ish,
// and the caller rounds them once.
//
// scratch: [B, Tq, Tk] (Acc) workspace for the raw scores, for the kernels that need one (CUDA);
// the CPU kernels keep them in per-thread buffers and take nullptr.
//
// Masking: mask [B, Tk] bool or nullptr, true = padding (weight 0). A query row with every key
// masked (or Tk = 0) gets zero weights and a zero context.
#pragma once

#include <cstdint>

#include "pyseqk/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyseqk {

#define PYSEQK_SEQ2SEQ_KERNELS(STREAM_ARG)                                                       \
  /* One fused pass: score, mask, softmax and weighted sum of the values.                     */ \
  /* q [B, Tq, D] (T); k [B, Tk, D] (T); values [B, Tk, Hv] (T); mask [B, Tk] or nullptr;    */  \
  /* context [B, Tq, Hv] (T) out; weights [B, Tq, Tk] (T) out.                                */ \
  /* score[b,i,j] = q[b,i] . k[b,j]                                                           */ \
  void luong_attention_forward(DType dtype, const void* q, const void* k, const void* values,    \
                               const bool* mask, void* context, void* weights, void* scratch,    \
                               int64_t B, int64_t Tq, int64_t Tk, int64_t D,                     \
                               int64_t Hv STREAM_ARG);                                           \
  /* The same with score[b,i,j] = sum_u v[u] tanh(wq[b,i,u] + uk[b,j,u]); wq [B, Tq, D],      */ \
  /* uk [B, Tk, D], v [D] (all T). The [B, Tq, Tk, D] tanh tensor is never stored.            */ \
  void bahdanau_attention_forward(DType dtype, const void* wq, const void* uk, const void* v,    \
                                  const void* values, const bool* mask, void* context,           \
                                  void* weights, void* scratch, int64_t B, int64_t Tq,           \
                                  int64_t Tk, int64_t D, int64_t Hv STREAM_ARG);                 \
  /* Backward of the score through the tanh, recomputing t = tanh(wq[b,i] + uk[b,j]) per      */ \
  /* (i, j) tile: ds [B, Tq, Tk] (Acc) = d loss / d score;                                    */ \
  /* dwq [B, Tq, D] (Acc) out = sum_j ds v (1 - t^2); duk [B, Tk, D] (Acc) out = sum_i ...;   */ \
  /* dv [D] (Acc) out = sum_{b,i,j} ds t. Entries with ds = 0 (masked keys) cost nothing.     */ \
  void bahdanau_attention_backward(DType dtype, const void* wq, const void* uk, const void* v,   \
                                   const void* ds, void* dwq, void* duk, void* dv, int64_t B,    \
                                   int64_t Tq, int64_t Tk, int64_t D STREAM_ARG);

namespace cpu {
PYSEQK_SEQ2SEQ_KERNELS()
}  // namespace cpu

namespace cuda {
#define PYSEQK_STREAM_ARG , cudaStream_t stream
PYSEQK_SEQ2SEQ_KERNELS(PYSEQK_STREAM_ARG)
#undef PYSEQK_STREAM_ARG
}  // namespace cuda

}  // namespace pyseqk
