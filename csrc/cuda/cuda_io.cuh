// Element access and element-wise launch helpers shared by the CUDA kernels (cells, layers,
// posenc, seq2seq). Half types load to and compute in fp32, double in double; stores round to
// nearest. In an anonymous namespace like the kernels that include it: one copy per file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "pyseqk/dtype.h"

namespace pyseqk {
namespace cuda {
namespace {

template <class T> struct MathType { using type = float; };
template <> struct MathType<double> { using type = double; };

template <class T> __device__ __forceinline__ typename MathType<T>::type ld(const T* p, int64_t i) {
  return static_cast<typename MathType<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
// The same through the read-only data cache (__ldg) for fp32/fp64: only for memory that no
// thread writes while the kernel runs.
template <class T>
__device__ __forceinline__ typename MathType<T>::type ld_ro(const T* p, int64_t i) {
  return static_cast<typename MathType<T>::type>(__ldg(p + i));
}
template <> __device__ __forceinline__ float ld_ro<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <> __device__ __forceinline__ float ld_ro<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <class T, class M> __device__ __forceinline__ void st(T* p, int64_t i, M v) {
  p[i] = static_cast<T>(v);
}
template <> __device__ __forceinline__ void st<__half, float>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, int64_t i,
                                                                    float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Blocks for n elements at `threads` a block: enough to fill any current GPU several times, the
// kernels' grid-stride loops cover the rest.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

// f(T{}) for the element type of dtype.
template <class F>
void dispatch(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
}

}  // namespace
}  // namespace cuda
}  // namespace pyseqk
