// Shared parts of the scaled-dot-product attention entry points (CPU: ops/sdpa.cpp; CUDA entries
// may use them too): argument checks and the conversion of at::Tensor arguments to SdpaArgs.
#pragma once

#include <ATen/ATen.h>

#include "pyseqk/sdpa_kernels.h"

namespace pyseqk {
namespace ops {

// query [B, Hq, L, E], key [B, Hk, S, E], value [B, Hk, S, Ev], Hq % Hk == 0, one dtype and
// device; attn_mask None or 4-D, bool or the query's dtype, broadcastable to [B, Hq, L, S];
// dropout_p in [0, 1). Each message names the argument, what was expected and what came.
void check_sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const c10::optional<at::Tensor>& attn_mask, double dropout_p);
// grad_out and out [B, Hq, L, Ev] of the query's dtype, lse [B, Hq, L] float32 (float64 for
// float64 inputs).
void check_sdpa_backward(const at::Tensor& grad_out, const at::Tensor& query,
                         const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                         const at::Tensor& lse);

// t itself when its last dimension is contiguous and its row stride can be a BLAS leading
// dimension, else a contiguous copy.
at::Tensor gemm_ready(const at::Tensor& t);
// The strides of a 4-D gemm_ready tensor as the kernels take them.
SdpaStrides strides_of(const at::Tensor& t);
// The mask as an additive tensor of `dtype` (bool: 0 / -inf), expanded to `full` as a view
// (stride 0 on broadcast dimensions); undefined when there is no mask.
at::Tensor additive_mask(const c10::optional<at::Tensor>& attn_mask, at::ScalarType dtype,
                         at::IntArrayRef full);
SdpaArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& mask, double dropout_p, bool is_causal, double scale,
                   int64_t seed);

}  // namespace ops
}  // namespace pyseqk
