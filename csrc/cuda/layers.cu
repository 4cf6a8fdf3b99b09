// Per-step kernels of the whole-sequence layers on NVIDIA GPUs: one thread per (row, hidden
// unit) of step t, the shared math of pyseqk/cell_math.h in fp32 (fp64 for double), per-row
// validity from lengths (see pyseqk/layer_kernels.h). The time loop and its cuBLAS GEMMs run on
// the host (csrc/ops/layers.h); each step is one GEMM and one of these launches, all on the
// caller's stream. Memory-bound like the cell kernels: sized for occupancy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_io.cuh"
#include "pyseqk/cell_math.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cuda {
namespace {


constexpr int kThreads = 256;

// Grid-stride loop over the (row, unit) pairs of one step with 64-bit indices; `valid` tells
// whether row b takes part in step t.
#define PYSEQK_FOR_EACH_ROW_UNIT(B, W)                                                        \
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < (B) * (W);         \
       idx += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ bool valid(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    lstm_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, T* gates, const T* c_prev,
             T* c_new, const T* h_prev, T* h_new, T* out) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    if (!valid(len, t, b)) {
      c_new[idx] = c_prev[idx];
      if (h_prev) {
        h_new[idx] = h_prev[idx];
      } else {
        st(h_new, idx, M(0));
      }
      if (out) st(out, idx, M(0));
      continue;
    }
    T* g = gates + b * 4 * H;
    const auto a = math::lstm_activate(ld(g, j), ld(g, H + j), ld(g, 2 * H + j), ld(g, 3 * H + j));
    M c, h;
    math::lstm_state(a, ld(c_prev, idx), c, h);
    st(g, j, a.i);
    st(g, H + j, a.f);
    st(g, 2 * H + j, a.g);
    st(g, 3 * H + j, a.o);
    st(c_new, idx, c);
    st(h_new, idx, h);
    if (out) st(out, idx, h);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    lstm_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* gates,
             const T* c_prev, const T* c_new, const T* dh, const T* grad_out, T* dc, T* dgates,
             T* dh_next) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* dg = dgates + b * 4 * H;
    if (!valid(len, t, b)) {
#pragma unroll
      for (int k = 0; k < 4; ++k) st(dg, k * H + j, M(0));
      if (dh_next) dh_next[idx] = dh[idx];
      continue;
    }
    const T* g = gates + b * 4 * H;
    const math::LstmGates<M> a{ld(g, j), ld(g, H + j), ld(g, 2 * H + j), ld(g, 3 * H + j)};
    const M dht = ld(dh, idx) + (grad_out ? ld(grad_out, idx) : M(0));
    math::LstmGates<M> d;
    M dc_prev;
    math::lstm_backward(a, ld(c_prev, idx), ld(c_new, idx), dht, ld(dc, idx), d, dc_prev);
    st(dg, j, d.i);
    st(dg, H + j, d.f);
    st(dg, 2 * H + j, d.g);
    st(dg, 3 * H + j, d.o);
    st(dc, idx, dc_prev);
    if (dh_next) st(dh_next, idx, M(0));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    select(int64_t t, const int64_t* len, int64_t B, int64_t P, T* out, const T* h_prev,
           T* h_new) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, P) {
    const int64_t b = idx / P;
    if (valid(len, t, b)) {
      h_new[idx] = out[idx];
    } else {
      h_new[idx] = h_prev[idx];
      st(out, idx, M(0));
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    grad(int64_t t, const int64_t* len, int64_t B, int64_t P, const T* dh, const T* grad_out,
         T* dr, T* dh_next) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, P) {
    const int64_t b = idx / P;
    if (valid(len, t, b)) {
      st(dr, idx, ld(dh, idx) + (grad_out ? ld(grad_out, idx) : M(0)));
      st(dh_next, idx, M(0));
    } else {
      st(dr, idx, M(0));
      dh_next[idx] = dh[idx];
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    gru_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* gi, const T* gh,
            const T* b_hn, const T* h_prev, T* ws, T* h_new, T* out) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* w = ws + b * 4 * H;
    if (!valid(len, t, b)) {
#pragma unroll
      for (int k = 0; k < 4; ++k) st(w, k * H + j, M(0));
      h_new[idx] = h_prev[idx];
      st(out, idx, M(0));
      continue;
    }
    const T* x = gi + b * 3 * H;
    const T* h = gh + b * 3 * H;
    const M hn = ld(h, 2 * H + j) + (b_hn ? ld(b_hn, j) : M(0));
    const auto a = math::gru_activate(ld(x, j), ld(x, H + j), ld(x, 2 * H + j), ld(h, j),
                                      ld(h, H + j), hn);
    const M hy = math::gru_state(a, ld(h_prev, idx));
    st(w, j, a.r);
    st(w, H + j, a.z);
    st(w, 2 * H + j, a.n);
    st(w, 3 * H + j, a.hn);
    st(h_new, idx, hy);
    st(out, idx, hy);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    gru_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* ws, const T* h_prev,
            const T* dh, const T* grad_out, T* dgi, T* dgh, T* dh_next) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H, j = idx - b * H;
    T* di = dgi + b * 3 * H;
    T* dhh = dgh + b * 3 * H;
    if (!valid(len, t, b)) {
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        st(di, k * H + j, M(0));
        st(dhh, k * H + j, M(0));
      }
      dh_next[idx] = dh[idx];
      continue;
    }
    const T* w = ws + b * 4 * H;
    const math::GruGates<M> a{ld(w, j), ld(w, H + j), ld(w, 2 * H + j), ld(w, 3 * H + j)};
    const M dht = ld(dh, idx) + (grad_out ? ld(grad_out, idx) : M(0));
    const auto d = math::gru_backward(a, ld(h_prev, idx), dht);
    st(di, j, d.r);
    st(di, H + j, d.z);
    st(di, 2 * H + j, d.in);
    st(dhh, j, d.r);
    st(dhh, H + j, d.z);
    st(dhh, 2 * H + j, d.hn);
    st(dh_next, idx, d.h_direct);
  }
}

template <class T, bool kRelu>
__global__ void __launch_bounds__(kThreads)
    rnn_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* pre, const T* h_prev,
            T* h_new, T* out) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H;
    if (!valid(len, t, b)) {
      h_new[idx] = h_prev[idx];
      st(out, idx, M(0));
      continue;
    }
    const M h = math::rnn_activate<M, kRelu>(ld(pre, idx));
    st(h_new, idx, h);
    st(out, idx, h);
  }
}

template <class T, bool kRelu>
__global__ void __launch_bounds__(kThreads)
    rnn_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* h_new, const T* dh,
            const T* grad_out, T* dpre, T* dh_next) {
  using M = typename MathType<T>::type;
  PYSEQK_FOR_EACH_ROW_UNIT(B, H) {
    const int64_t b = idx / H;
    if (!valid(len, t, b)) {
      st(dpre, idx, M(0));
      dh_next[idx] = dh[idx];
      continue;
    }
    const M dht = ld(dh, idx) + (grad_out ? ld(grad_out, idx) : M(0));
    st(dpre, idx, math::rnn_backward<M, kRelu>(ld(h_new, idx), dht));
    st(dh_next, idx, M(0));
  }
}


template <class T> T* p(void* x) { return static_cast<T*>(x); }
template <class T> const T* p(const void* x) { return static_cast<const T*>(x); }

}  // namespace

#define PYSEQK_LAUNCH(kernel, n, ...)                                \
  do {                                                               \
    if ((n) > 0) {                                                   \
      kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(__VA_ARGS__);     \
    }                                                                \
  } while (0)

void lstm_layer_forward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t H,
                             void* gates, const void* c_prev, void* c_new, const void* h_prev,
                             void* h_new, void* out, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(lstm_fwd<T>, B * H, t, lengths, B, H, p<T>(gates), p<T>(c_prev), p<T>(c_new),
                  p<T>(h_prev), p<T>(h_new), p<T>(out));
  });
}

void lstm_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,
                              int64_t H, const void* gates, const void* c_prev, const void* c_new,
                              const void* dh, const void* grad_out, void* dc, void* dgates,
                              void* dh_next, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(lstm_bwd<T>, B * H, t, lengths, B, H, p<T>(gates), p<T>(c_prev), p<T>(c_new),
                  p<T>(dh), p<T>(grad_out), p<T>(dc), p<T>(dgates), p<T>(dh_next));
  });
}

void layer_select_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,
                       void* out, const void* h_prev, void* h_new, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(select<T>, B * P, t, lengths, B, P, p<T>(out), p<T>(h_prev), p<T>(h_new));
  });
}

void layer_grad_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,
                     const void* dh, const void* grad_out, void* dr, void* dh_next,
                     cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(grad<T>, B * P, t, lengths, B, P, p<T>(dh), p<T>(grad_out), p<T>(dr),
                  p<T>(dh_next));
  });
}

void gru_layer_forward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t H,
                            const void* gi, const void* gh, const void* b_hn, const void* h_prev,
                            void* ws, void* h_new, void* out, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(gru_fwd<T>, B * H, t, lengths, B, H, p<T>(gi), p<T>(gh), p<T>(b_hn),
                  p<T>(h_prev), p<T>(ws), p<T>(h_new), p<T>(out));
  });
}

void gru_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t H,
                             const void* ws, const void* h_prev, const void* dh,
                             const void* grad_out, void* dgi, void* dgh, void* dh_next,
                             cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    PYSEQK_LAUNCH(gru_bwd<T>, B * H, t, lengths, B, H, p<T>(ws), p<T>(h_prev), p<T>(dh),
                  p<T>(grad_out), p<T>(dgi), p<T>(dgh), p<T>(dh_next));
  });
}

void rnn_layer_forward_step(DType dtype, bool relu, int64_t t, const int64_t* lengths, int64_t B,
                            int64_t H, const void* pre, const void* h_prev, void* h_new, void* out,
                            cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (relu) {
      PYSEQK_LAUNCH((rnn_fwd<T, true>), B * H, t, lengths, B, H, p<T>(pre), p<T>(h_prev),
                    p<T>(h_new), p<T>(out));
    } else {
      PYSEQK_LAUNCH((rnn_fwd<T, false>), B * H, t, lengths, B, H, p<T>(pre), p<T>(h_prev),
                    p<T>(h_new), p<T>(out));
    }
  });
}

void rnn_layer_backward_step(DType dtype, bool relu, int64_t t, const int64_t* lengths, int64_t B,
                             int64_t H, const void* h_new, const void* dh, const void* grad_out,
                             void* dpre, void* dh_next, cudaStream_t stream) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (relu) {
      PYSEQK_LAUNCH((rnn_bwd<T, true>), B * H, t, lengths, B, H, p<T>(h_new), p<T>(dh),
                    p<T>(grad_out), p<T>(dpre), p<T>(dh_next));
    } else {
      PYSEQK_LAUNCH((rnn_bwd<T, false>), B * H, t, lengths, B, H, p<T>(h_new), p<T>(dh),
                    p<T>(grad_out), p<T>(dpre), p<T>(dh_next));
    }
  });
}

}  // namespace cuda
}  // namespace pyseqk
