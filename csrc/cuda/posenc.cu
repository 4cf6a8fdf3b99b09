// Positional encoding fused with its add and dropout on NVIDIA GPUs, and the dropout backward.
// Memory-bound: one load and one store per element. A block covers a tile of rows x features:
// blockDim.x threads along the features of a row (coalesced), blockDim.y rows; the position of
// a row costs one integer division per row, not per element, and the frequency of a feature
// is computed once per thread and reused for every row it visits (grid-stride over rows).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_io.cuh"
#include "pyseqk/posenc.h"

namespace pyseqk {
namespace cuda {
namespace {


// sin (even d) or cos (odd d) of angle. fp32: reduced to [-pi, pi] first, because __sincosf is
// the hardware approximation, accurate only there (sinf/cosf would be accurate everywhere but
// keep a Payne-Hanek slow path with a stack frame for huge angles); the
// reduction is exact for |k| < 2^16 (angles below ~4e5; max_len is 5000 by default).
__device__ __forceinline__ float encoding(float angle, bool odd) {
  const float k = rintf(angle * 0.15915494309189535f);
  float r = fmaf(-k, 6.28125f, angle);
  r = fmaf(-k, 0.0019353071795864769f, r);
  float s, c;
  __sincosf(r, &s, &c);
  return odd ? c : s;
}
__device__ __forceinline__ double encoding(double angle, bool odd) {
  double s, c;
  sincos(angle, &s, &c);
  return odd ? c : s;
}

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) posenc_fwd(const T* x, T* out, int64_t rows,
                                                       int64_t T_, int64_t R, int64_t D,
                                                       bool drop, uint32_t seed,
                                                       uint32_t threshold, double scale_d) {
  using M = typename MathType<T>::type;
  const int64_t d = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  const M freq = static_cast<M>(posenc::frequency(d, D));
  const bool odd = d & 1;
  const M scale = static_cast<M>(scale_d);
  for (int64_t row = blockIdx.x * int64_t(blockDim.y) + threadIdx.y; row < rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t t = (row / R) % T_;
    const int64_t i = row * D + d;
    M v = ld(x, i) + encoding(static_cast<M>(t) * freq, odd);
    if (drop) v *= posenc::keep(seed, static_cast<uint64_t>(i), threshold) ? scale : M(0);
    st(out, i, v);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) posenc_bwd(const T* grad, T* grad_x, int64_t N,
                                                       bool drop, uint32_t seed,
                                                       uint32_t threshold, double scale_d) {
  using M = typename MathType<T>::type;
  const M scale = static_cast<M>(scale_d);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N;
       i += int64_t(gridDim.x) * blockDim.x) {
    M g = ld(grad, i);
    if (drop) g *= posenc::keep(seed, static_cast<uint64_t>(i), threshold) ? scale : M(0);
    st(grad_x, i, g);
  }
}


// Enough blocks to fill any current GPU several times over; the loops stride over the rest.
constexpr int64_t kMaxBlocks = 1 << 16;

}  // namespace

void positional_encoding_forward(DType dtype, const void* x, void* out, int64_t N, int64_t T,
                                 int64_t R, int64_t D, double p, uint32_t seed,
                                 cudaStream_t stream) {
  if (N == 0) return;
  // Threads along features: the smallest power of two >= D, from 32 up to kThreads.
  int tx = 32;
  while (tx < D && tx < kThreads) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int64_t rows = N / D;
  const int64_t feature_blocks = (D + tx - 1) / tx;  // <= 65535 for D <= 16.7M
  const dim3 grid(static_cast<unsigned>(std::min(kMaxBlocks, (rows + block.y - 1) / block.y)),
                  static_cast<unsigned>(feature_blocks));
  dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    posenc_fwd<S><<<grid, block, 0, stream>>>(static_cast<const S*>(x), static_cast<S*>(out),
                                              rows, T, R, D, p > 0.0, seed, dropout::threshold(p),
                                              posenc::keep_scale(p));
  });
}

void positional_encoding_backward(DType dtype, const void* grad, void* grad_x, int64_t N,
                                  double p, uint32_t seed, cudaStream_t stream) {
  if (N == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min(kMaxBlocks, (N + kThreads - 1) / kThreads));
  dispatch(dtype, [&](auto tag) {
    using S = decltype(tag);
    posenc_bwd<S><<<blocks, kThreads, 0, stream>>>(static_cast<const S*>(grad),
                                                   static_cast<S*>(grad_x), N, p > 0.0, seed,
                                                   dropout::threshold(p),
                                                   posenc::keep_scale(p));
  });
}

}  // namespace cuda
}  // namespace pyseqk
