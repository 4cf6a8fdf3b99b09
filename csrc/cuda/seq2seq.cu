// Fused seq2seq attention on NVIDIA GPUs (Luong dot, Bahdanau additive). Torch-free.
//
// Forward: one block per query row (b, i), so a decoder step (Tq = 1) is simply B blocks. Each
// warp scores one key at a time (lanes split the D features, a shuffle reduction sums them), the
// raw scores go to the row's slice of `scratch`, the block takes max and sum, writes the weights,
// and then its threads each own value features h for the context sum over keys (coalesced).
// Bahdanau never stores a tanh: the score loop computes v[u] tanh(wq[u] + uk[j, u]) on the fly.
//
// Backward (Bahdanau): two kernels recompute t = tanh(wq[b,i,u] + uk[b,j,u]): one block per query
// row sums over keys (dwq, and dv through one atomicAdd per feature and row), one block per key
// row sums over queries (duk). Threads own features u, so every load is coalesced; ds = 0
// entries (masked keys) skip their tanh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_io.cuh"
#include "pyseqk/seq2seq_kernels.h"

namespace pyseqk {
namespace cuda {
namespace {


__device__ __forceinline__ float fast_tanh(float x) { return tanhf(x); }
// libdevice's double tanh, and a double division, keep slow paths on the stack that spill. Here:
// 1 - 2 / (exp(2x) + 1) with the reciprocal from a float estimate and two Newton steps (23 -> 46
// -> full 53 bits); |x| <= 20 keeps the float estimate finite and already rounds tanh to +-1.
__device__ __forceinline__ double fast_tanh(double x) {
  const double d = exp(2.0 * fmin(fmax(x, -20.0), 20.0)) + 1.0;
  double r = static_cast<double>(__frcp_rn(static_cast<float>(d)));
  r = r * (2.0 - d * r);
  r = r * (2.0 - d * r);
  return 1.0 - 2.0 * r;
}
__device__ __forceinline__ float fast_exp(float x) { return expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <class M> __device__ __forceinline__ M warp_sum(M x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <class M> __device__ __forceinline__ M warp_max(M x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Block-wide reduction through shared memory; every thread gets the result.
template <class M, bool kMax> __device__ __forceinline__ M block_reduce(M x, M* smem) {
  x = kMax ? warp_max(x) : warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  M r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = kMax ? fmax(r, smem[w]) : r + smem[w];
  return r;
}

template <class T, bool kAdditive>
__global__ void __launch_bounds__(kThreads) attention_fwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ values, const bool* __restrict__ mask, T* __restrict__ context,
    T* __restrict__ weights, typename MathType<T>::type* __restrict__ scratch, int64_t Tq,
    int64_t Tk, int64_t D, int64_t Hv) {
  using M = typename MathType<T>::type;
  __shared__ M red[kWarps];
  const int64_t row = blockIdx.x;  // b * Tq + i
  const int64_t b = row / Tq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qr = q + row * D;
  M* s = scratch + row * Tk;
  const M neg_inf = -INFINITY;
  M mx = neg_inf;
  for (int64_t j = warp; j < Tk; j += kWarps) {
    M acc = neg_inf;
    if (!(mask && mask[b * Tk + j])) {
      const T* kr = k + (b * Tk + j) * D;
      auto term = [&](int64_t d) -> M {
        if (kAdditive) return ld_ro(v, d) * fast_tanh(ld_ro(qr, d) + ld_ro(kr, d));
        return ld_ro(qr, d) * ld_ro(kr, d);
      };
      acc = 0;
      if (sizeof(M) == 8 && kAdditive) {
        // Not unrolled: the fp64 tanh's exp keeps a slow path whose call spills when unrolled.
#pragma unroll 1
        for (int64_t d = lane; d < D; d += 32) acc += term(d);
      } else {
        for (int64_t d = lane; d < D; d += 32) acc += term(d);
      }
      acc = warp_sum(acc);
    }
    if (lane == 0) s[j] = acc;
    mx = fmax(mx, acc);
  }
  mx = block_reduce<M, true>(mx, red);  // also orders the score stores before the reads below
  // A row with no key left (mx = -inf) gets zero weights: shift by 0 and scale by 0.
  const bool empty = mx == neg_inf;
  const M shift = empty ? M(0) : mx;
  M sum = 0;
  for (int64_t j = threadIdx.x; j < Tk; j += kThreads) sum += fast_exp(s[j] - shift);
  sum = block_reduce<M, false>(sum, red);
  const M inv = empty ? M(0) : M(1) / sum;
  T* w = weights + row * Tk;
  for (int64_t j = threadIdx.x; j < Tk; j += kThreads) {
    const M p = fast_exp(s[j] - shift) * inv;
    s[j] = p;
    st(w, j, p);
  }
  __syncthreads();
  const T* vb = values + b * Tk * Hv;
  for (int64_t h = threadIdx.x; h < Hv; h += kThreads) {
    M acc = 0;
    for (int64_t j = 0; j < Tk; ++j) {
      const M p = s[j];
      if (p != M(0)) acc += p * ld_ro(vb, j * Hv + h);
    }
    st(context, row * Hv + h, acc);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) bahdanau_bwd_q(
    const T* __restrict__ wq, const T* __restrict__ uk, const T* __restrict__ v,
    const typename MathType<T>::type* __restrict__ ds, typename MathType<T>::type* __restrict__ dwq,
    typename MathType<T>::type* __restrict__ dv, int64_t Tq, int64_t Tk, int64_t D) {
  using M = typename MathType<T>::type;
  const int64_t row = blockIdx.x;
  const int64_t b = row / Tq;
  for (int64_t d = blockIdx.y * int64_t(kThreads) + threadIdx.x; d < D;
       d += int64_t(gridDim.y) * kThreads) {
    const M a = ld_ro(wq, row * D + d);
    M ga = 0, gv = 0;
    for (int64_t j = 0; j < Tk; ++j) {
      const M g = ds[row * Tk + j];
      if (g == M(0)) continue;
      const M t = fast_tanh(a + ld_ro(uk, (b * Tk + j) * D + d));
      ga += g * (M(1) - t * t);
      gv += g * t;
    }
    dwq[row * D + d] = ga * ld_ro(v, d);
    atomicAdd(dv + d, gv);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) bahdanau_bwd_k(
    const T* __restrict__ wq, const T* __restrict__ uk, const T* __restrict__ v,
    const typename MathType<T>::type* __restrict__ ds, typename MathType<T>::type* __restrict__ duk,
    int64_t Tq, int64_t Tk, int64_t D) {
  using M = typename MathType<T>::type;
  const int64_t krow = blockIdx.x;  // b * Tk + j
  const int64_t b = krow / Tk, j = krow - b * Tk;
  for (int64_t d = blockIdx.y * int64_t(kThreads) + threadIdx.x; d < D;
       d += int64_t(gridDim.y) * kThreads) {
    const M kv = ld_ro(uk, krow * D + d);
    M gk = 0;
    for (int64_t i = 0; i < Tq; ++i) {
      const M g = ds[(b * Tq + i) * Tk + j];
      if (g == M(0)) continue;
      const M t = fast_tanh(ld_ro(wq, (b * Tq + i) * D + d) + kv);
      gk += g * (M(1) - t * t);
    }
    duk[krow * D + d] = gk * ld_ro(v, d);
  }
}


// Grid dimension 0 takes up to 2^31 - 1 blocks, dimension 1 up to 65535.
unsigned feature_blocks(int64_t D) {
  const int64_t n = (D + kThreads - 1) / kThreads;
  return static_cast<unsigned>(n < 65535 ? n : 65535);
}

template <bool kAdditive>
void launch_forward(DType dtype, const void* q, const void* k, const void* v, const void* values,
                    const bool* mask, void* context, void* weights, void* scratch, int64_t B,
                    int64_t Tq, int64_t Tk, int64_t D, int64_t Hv, cudaStream_t stream) {
  if (B * Tq == 0) return;
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = typename MathType<T>::type;
    attention_fwd<T, kAdditive><<<static_cast<unsigned>(B * Tq), kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(values), mask, static_cast<T*>(context), static_cast<T*>(weights),
        static_cast<M*>(scratch), Tq, Tk, D, Hv);
  });
}

}  // namespace

void luong_attention_forward(DType dtype, const void* q, const void* k, const void* values,
                             const bool* mask, void* context, void* weights, void* scratch,
                             int64_t B, int64_t Tq, int64_t Tk, int64_t D, int64_t Hv,
                             cudaStream_t stream) {
  launch_forward<false>(dtype, q, k, nullptr, values, mask, context, weights, scratch, B, Tq, Tk,
                        D, Hv, stream);
}

void bahdanau_attention_forward(DType dtype, const void* wq, const void* uk, const void* v,
                                const void* values, const bool* mask, void* context,
                                void* weights, void* scratch, int64_t B, int64_t Tq, int64_t Tk,
                                int64_t D, int64_t Hv, cudaStream_t stream) {
  launch_forward<true>(dtype, wq, uk, v, values, mask, context, weights, scratch, B, Tq, Tk, D,
                       Hv, stream);
}

void bahdanau_attention_backward(DType dtype, const void* wq, const void* uk, const void* v,
                                 const void* ds, void* dwq, void* duk, void* dv, int64_t B,
                                 int64_t Tq, int64_t Tk, int64_t D, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = typename MathType<T>::type;
    cudaMemsetAsync(dv, 0, D * sizeof(M), stream);
    if (B * Tq * Tk * D == 0) {
      cudaMemsetAsync(dwq, 0, B * Tq * D * sizeof(M), stream);
      cudaMemsetAsync(duk, 0, B * Tk * D * sizeof(M), stream);
      return;
    }
    const dim3 grid_q(static_cast<unsigned>(B * Tq), feature_blocks(D));
    const dim3 grid_k(static_cast<unsigned>(B * Tk), feature_blocks(D));
    bahdanau_bwd_q<T><<<grid_q, kThreads, 0, stream>>>(
        static_cast<const T*>(wq), static_cast<const T*>(uk), static_cast<const T*>(v),
        static_cast<const M*>(ds), static_cast<M*>(dwq), static_cast<M*>(dv), Tq, Tk, D);
    bahdanau_bwd_k<T><<<grid_k, kThreads, 0, stream>>>(
        static_cast<const T*>(wq), static_cast<const T*>(uk), static_cast<const T*>(v),
        static_cast<const M*>(ds), static_cast<M*>(duk), Tq, Tk, D);
  });
}

}  // namespace cuda
}  // namespace pyseqk
