// Sinusoidal positional encoding ("Attention Is All You Need") fused with its add and dropout:
// out = dropout(x + pe[t]), pe[t, 2i] = sin(t w_i), pe[t, 2i+1] = cos(t w_i),
// w_i = 10000^(-2i/D). The sinusoid is computed in the kernel (no table is read), and the
// dropout mask is a pure hash of (seed, element index), so the backward recomputes it instead
// of storing it and every backend drops the same elements. Torch-free; pyseqk/reference.py
// (positional_encoding_keep_mask) and kernels/posenc.py mirror it exactly:
//
//   idx = element index in the contiguous tensor, hi = idx >> 32, lo = idx & 0xFFFFFFFF
//   r = dropout::row_key(seed, hi, lo) = fmix32(fmix32(seed ^ hi * 0x9E3779B9) ^ lo * 0x85EBCA77)
//   keep  <=>  (r >> 8) >= threshold(p); kept values are scaled by 1 / (1 - p) (0 when p >= 1).
#pragma once

#include <cmath>
#include <cstdint>

#include "pyseqk/dropout_hash.h"
#include "pyseqk/dtype.h"
#include "pyseqk/macros.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyseqk {
namespace posenc {

// log2(10000): w_i = exp2(-(2i) * log2(10000) / D).
constexpr double kLog2Base = 13.287712379549449;

// The frequency of feature d (the pair index i = d / 2), computed in double once per feature.
PYSEQK_HD double frequency(int64_t d, int64_t D) {
  return exp2(-static_cast<double>(d - (d & 1)) * kLog2Base / static_cast<double>(D));
}

PYSEQK_HD uint32_t hash_of(uint32_t seed, uint64_t idx) {
  return dropout::row_key(seed, static_cast<uint32_t>(idx >> 32), static_cast<uint32_t>(idx));
}

PYSEQK_HD bool keep(uint32_t seed, uint64_t idx, uint32_t threshold) {
  return (hash_of(seed, idx) >> 8) >= threshold;
}

// 1 / (1 - p), and 0 when everything is dropped (so that 0 * inf never makes a NaN).
PYSEQK_HD double keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

}  // namespace posenc

// Launchers. x, out, grad, grad_x: contiguous, N elements of `dtype`, N a multiple of D. Element
// idx is feature d = idx % D of row idx / D, at position t = (idx / D / R) % T:
//   x [T, B, D]  -> R = B;   x [B, T, D] (batch_first) or [T, D] -> R = 1.
// p in [0, 1]: dropout probability (0: no dropout, no hashing). seed: the dropout seed.
#define PYSEQK_POSENC_KERNELS(STREAM_ARG)                                                       \
  void positional_encoding_forward(DType dtype, const void* x, void* out, int64_t N, int64_t T, \
                                   int64_t R, int64_t D, double p, uint32_t seed STREAM_ARG);   \
  /* grad_x = grad * keep * 1/(1-p): the add has gradient 1, so only the mask remains        */ \
  void positional_encoding_backward(DType dtype, const void* grad, void* grad_x, int64_t N,     \
                                    double p, uint32_t seed STREAM_ARG);

namespace cpu {
PYSEQK_POSENC_KERNELS()
}  // namespace cpu

namespace cuda {
#define PYSEQK_STREAM_ARG , cudaStream_t stream
PYSEQK_POSENC_KERNELS(PYSEQK_STREAM_ARG)
#undef PYSEQK_STREAM_ARG
}  // namespace cuda

}  // namespace pyseqk
