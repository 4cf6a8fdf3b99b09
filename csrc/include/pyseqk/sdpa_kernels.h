// Launcher declarations of the fused scaled-dot-product attention kernels on the CPU
// (csrc/cpu/sdpa.cpp). The CUDA launchers are declared in pyseqk/sdpa_cuda.h. Torch-free.
//
// Shapes: query [B, Hq, L, E], key [B, Hk, S, E], value [B, Hk, S, Ev], Hq % Hk == 0; query head
// h reads key/value head h / (Hq / Hk). query, key, value (and grad_out, out in the backward) are
// addressed through their batch, head and row strides (in elements); their last dimension is
// contiguous and their row stride is at least their last dimension (a BLAS leading dimension).
// The mask, when given, is additive, in the kernel's dtype, indexed [b, h, i, j] through four
// strides (stride 0 on broadcast dimensions: the entry never materialises it).
// Outputs are contiguous: out [B, Hq, L, Ev], lse [B, Hq, L], and in the backward
// grad_query [B, Hq, L, E], grad_key [B, Hk, S, E], grad_value [B, Hk, S, Ev].
#pragma once

#include <cstdint>

#include "pyseqk/dtype.h"

namespace pyseqk {

struct SdpaStrides {
  int64_t b, h, row;  // elements; the last dimension has stride 1
};

struct SdpaArgs {
  int64_t B, Hq, Hk, L, S, E, Ev;
  const void* query;
  SdpaStrides sq;
  const void* key;
  SdpaStrides sk;
  const void* value;
  SdpaStrides sv;
  const void* mask;  // additive, kernel dtype, or nullptr
  int64_t mask_stride[4];
  double scale;
  double dropout_p;  // in [0, 1); the keep mask is pyseqk/dropout_hash.h with bh = b * Hq + h
  uint32_t seed;
  bool is_causal;  // top-left: query i sees keys j <= i
};

namespace cpu {

// dtype: kFloat32 or kFloat64 (the entry widens half types to float32).
// out [B, Hq, L, Ev] and lse [B, Hq, L] in dtype; lse: natural-log logsumexp of the scaled, masked scores
// over the keys, +inf for a row with no key to attend (its out row is zero, and the backward's
// recomputed probabilities exp(s - lse) are zero: zero gradients, as torch's CPU kernel gives).
// (lse is kept in the compute dtype: float32 would put 6e-8 relative errors into every float64
// probability the backward recomputes.)
void sdpa_forward(DType dtype, const SdpaArgs& a, void* out, void* lse);

// grad_out and out [B, Hq, L, Ev] through their strides; lse as the forward wrote it. grad_query,
// grad_key, grad_value: contiguous outputs in dtype, fully written (no need to zero them).
void sdpa_backward(DType dtype, const SdpaArgs& a, const void* grad_out, SdpaStrides sdo,
                   const void* out, SdpaStrides so, const void* lse, void* grad_query,
                   void* grad_key, void* grad_value);

}  // namespace cpu
}  // namespace pyseqk
