// Fused pointwise parts of the RNN/LSTM/GRU cells on NVIDIA GPUs. One thread per (row, hidden
// unit): it reads that unit's gate sums, runs the shared math of pyseqk/cell_math.h in fp32
// (fp64 for double), and writes the state and the workspace. Memory-bound: 4H+2H loads and
// 4H+2H stores per LSTM row, so the launch is sized for occupancy, not for arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_io.cuh"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/cell_math.h"

namespace pyseqk {
namespace cuda {
namespace {

template <class T> __device__ __forceinline__ typename MathType<T>::type ld_or0(const T* p, int64_t i) {
  return p ? ld(p, i) : typename MathType<T>::type(0);
}

constexpr int kThreads = 256;

// Grid-stride loop over the B*H (row, unit) pairs with 64-bit indices.
#define PYSEQK_FOR_EACH_UNIT(B, H)                                                    \
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < (B) * (H); \
       idx += int64_t(gridDim.x) * blockDim.x)

template <class T>
__global__ void __launch_bounds__(kThreads) lstm_fwd(T* ws, const T* b_ih, const T* b_hh,
                                                     const T* cx, T* hy, T* cy, int64_t B,
                                                     int64_t H) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* g = ws + b * 4 * H;
    M pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) pre[k] = ld(g, k * H + j) + ld_or0(b_ih, k * H + j) + ld_or0(b_hh, k * H + j);
    const auto a = math::lstm_activate(pre[0], pre[1], pre[2], pre[3]);
    M c, h;
    math::lstm_state(a, ld(cx, idx), c, h);
    st(g, j, a.i);
    st(g, H + j, a.f);
    st(g, 2 * H + j, a.g);
    st(g, 3 * H + j, a.o);
    st(cy, idx, c);
    st(hy, idx, h);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) lstm_bwd(const T* ws, const T* cx, const T* cy,
                                                     const T* dhy, const T* dcy, T* dgates,
                                                     T* dcx, int64_t B, int64_t H) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    const T* g = ws + b * 4 * H;
    const math::LstmGates<M> a{ld(g, j), ld(g, H + j), ld(g, 2 * H + j), ld(g, 3 * H + j)};
    math::LstmGates<M> d;
    M dc_prev;
    math::lstm_backward(a, ld(cx, idx), ld(cy, idx), ld_or0(dhy, idx), ld_or0(dcy, idx), d, dc_prev);
    T* dg = dgates + b * 4 * H;
    st(dg, j, d.i);
    st(dg, H + j, d.f);
    st(dg, 2 * H + j, d.g);
    st(dg, 3 * H + j, d.o);
    st(dcx, idx, dc_prev);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) gru_fwd(T* ws, const T* b_ih, const T* b_hh,
                                                    const T* hx, T* hy, int64_t B, int64_t H) {
  PYSEQK_FOR_EACH_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* g = ws + b * 6 * H;
    const auto a = math::gru_activate(
        ld(g, j) + ld_or0(b_ih, j), ld(g, H + j) + ld_or0(b_ih, H + j),
        ld(g, 2 * H + j) + ld_or0(b_ih, 2 * H + j), ld(g, 3 * H + j) + ld_or0(b_hh, j),
        ld(g, 4 * H + j) + ld_or0(b_hh, H + j), ld(g, 5 * H + j) + ld_or0(b_hh, 2 * H + j));
    st(hy, idx, math::gru_state(a, ld(hx, idx)));
    st(g, j, a.r);
    st(g, H + j, a.z);
    st(g, 2 * H + j, a.n);
    st(g, 3 * H + j, a.hn);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) gru_bwd(const T* ws, const T* hx, const T* dhy,
                                                    T* dgi, T* dgh, T* dh_direct, int64_t B,
                                                    int64_t H) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    const T* g = ws + b * 6 * H;
    const math::GruGates<M> a{ld(g, j), ld(g, H + j), ld(g, 2 * H + j), ld(g, 3 * H + j)};
    const auto d = math::gru_backward(a, ld(hx, idx), ld(dhy, idx));
    T* di = dgi + b * 3 * H;
    T* dh = dgh + b * 3 * H;
    st(di, j, d.r);
    st(di, H + j, d.z);
    st(di, 2 * H + j, d.in);
    st(dh, j, d.r);
    st(dh, H + j, d.z);
    st(dh, 2 * H + j, d.hn);
    st(dh_direct, idx, d.h_direct);
  }
}

template <class T, bool kRelu>
__global__ void __launch_bounds__(kThreads) rnn_fwd(T* hy, const T* b_ih, const T* b_hh,
                                                    int64_t B, int64_t H) {
  PYSEQK_FOR_EACH_UNIT(B, H) {
    const int64_t j = idx % H;
    st(hy, idx, math::rnn_activate<typename MathType<T>::type, kRelu>(
                    ld(hy, idx) + ld_or0(b_ih, j) + ld_or0(b_hh, j)));
  }
}

template <class T, bool kRelu>
__global__ void __launch_bounds__(kThreads) rnn_bwd(const T* hy, const T* dhy, T* dpre, int64_t B,
                                                    int64_t H) {
  PYSEQK_FOR_EACH_UNIT(B, H) {
    st(dpre, idx, math::rnn_backward<typename MathType<T>::type, kRelu>(ld(hy, idx), ld(dhy, idx)));
  }
}


}  // namespace

#define PYSEQK_LAUNCH(kernel, n, ...)                                          \
  do {                                                                         \
    if ((n) > 0) {                                                             \
      kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(__VA_ARGS__);               \
    }                                                                          \
  } while (0)

void lstm_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh, const void* cx,
                       void* hy, void* cy, int64_t B, int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(lstm_fwd<T>, B * H, static_cast<T*>(ws), static_cast<const T*>(b_ih),
                  static_cast<const T*>(b_hh), static_cast<const T*>(cx), static_cast<T*>(hy),
                  static_cast<T*>(cy), B, H);
  });
}

void lstm_cell_backward(DType dtype, const void* ws, const void* cx, const void* cy,
                        const void* dhy, const void* dcy, void* dgates, void* dcx, int64_t B,
                        int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(lstm_bwd<T>, B * H, static_cast<const T*>(ws), static_cast<const T*>(cx),
                  static_cast<const T*>(cy), static_cast<const T*>(dhy),
                  static_cast<const T*>(dcy), static_cast<T*>(dgates), static_cast<T*>(dcx), B, H);
  });
}

void gru_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh, const void* hx,
                      void* hy, int64_t B, int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(gru_fwd<T>, B * H, static_cast<T*>(ws), static_cast<const T*>(b_ih),
                  static_cast<const T*>(b_hh), static_cast<const T*>(hx), static_cast<T*>(hy), B,
                  H);
  });
}

void gru_cell_backward(DType dtype, const void* ws, const void* hx, const void* dhy, void* dgi,
                       void* dgh, void* dh_direct, int64_t B, int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(gru_bwd<T>, B * H, static_cast<const T*>(ws), static_cast<const T*>(hx),
                  static_cast<const T*>(dhy), static_cast<T*>(dgi), static_cast<T*>(dgh),
                  static_cast<T*>(dh_direct), B, H);
  });
}

void rnn_cell_forward(DType dtype, bool relu, void* hy, const void* b_ih, const void* b_hh,
                      int64_t B, int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* h = static_cast<T*>(hy);
    auto* bi = static_cast<const T*>(b_ih);
    auto* bh = static_cast<const T*>(b_hh);
    if (relu) {
      PYSEQK_LAUNCH((rnn_fwd<T, true>), B * H, h, bi, bh, B, H);
    } else {
      PYSEQK_LAUNCH((rnn_fwd<T, false>), B * H, h, bi, bh, B, H);
    }
  });
}

void rnn_cell_backward(DType dtype, bool relu, const void* hy, const void* dhy, void* dpre,
                       int64_t B, int64_t H, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* h = static_cast<const T*>(hy);
    auto* g = static_cast<const T*>(dhy);
    auto* d = static_cast<T*>(dpre);
    if (relu) {
      PYSEQK_LAUNCH((rnn_bwd<T, true>), B * H, h, g, d, B, H);
    } else {
      PYSEQK_LAUNCH((rnn_bwd<T, false>), B * H, h, g, d, B, H);
    }
  });
}

}  // namespace cuda
}  // namespace pyseqk
