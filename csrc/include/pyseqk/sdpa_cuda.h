// Launcher declarations of the fused scaled-dot-product attention kernels on NVIDIA GPUs
// (csrc/cuda/sdpa.cu). Torch-free.
//
// B batch, Hq query heads, Hk key/value heads (Hq % Hk == 0: query head h reads kv head
// h / (Hq / Hk)), L queries, S keys, E = query/key head dim, Ev = value head dim (both <= 256).
// Strides are in elements, ordered [b, h, row, col]; any strides (stride 0 for broadcast).
//   q    [B, Hq, L, E]      k [B, Hk, S, E]      v [B, Hk, S, Ev]      (dtype)
//   mask [B, Hq, L, S] or nullptr: bool (1 byte, nonzero = take part) or additive (dtype)
//   out  [B, Hq, L, Ev] contiguous (dtype); lse [B, Hq, L] contiguous float32, natural log,
//        -inf on a row that sees no key (its output is 0 and its gradients are 0)
//   grad_out, out (backward) [B, Hq, L, Ev] with their own strides
//   delta [B, Hq, L] float32 workspace (backward); dq, dk, dv contiguous like q, k, v
// is_causal: top-left aligned, query i sees keys j <= i (also when L != S). Dropout drops what
// pyseqk/dropout_hash.h drops with bh = b * Hq + h, i = query row, j = key column.
#pragma once

#include <cstdint>

#include "pyseqk/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyseqk {
namespace cuda {

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

struct SdpaParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* mask = nullptr;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t mask_stride[4] = {0, 0, 0, 0};
  int64_t B = 0, Hq = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;
  MaskKind mask_kind = MaskKind::kNone;
  bool is_causal = false;
  double scale = 1.0;
  double dropout_p = 0.0;
  uint32_t seed = 0;
};

// out, lse: see above. Every launch is on `stream`; launch errors are left for the caller to
// check (C10_CUDA_KERNEL_LAUNCH_CHECK in csrc/ops/sdpa_cuda.cpp).
void sdpa_forward(DType dtype, const SdpaParams& p, void* out, float* lse, cudaStream_t stream);

// grad_out / out with strides go_stride / out_stride; delta: workspace; dq, dk, dv out.
void sdpa_backward(DType dtype, const SdpaParams& p, const void* grad_out,
                   const int64_t go_stride[4], const void* out, const int64_t out_stride[4],
                   const float* lse, float* delta, void* dq, void* dk, void* dv,
                   cudaStream_t stream);

// Largest head dim the kernels take.
constexpr int64_t kSdpaMaxHeadDim = 256;

}  // namespace cuda
}  // namespace pyseqk
