// Per-step kernels of the whole-sequence layers on the CPU: the gate math of cell_math.h over the
// batch, with per-row validity (lengths), vectorized with at::vec and split over the cores with
// at::parallel_for. The time loop and its GEMMs are in csrc/ops/layers.h.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/vec_io.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cpu {
namespace {

template <class F>
void dispatch(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

inline bool valid(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

template <class T>
inline void vzero(T* p, int64_t n) {
  vstore(p, OpVec<T>(0), n);
}

template <class T>
inline void vcopy(const T* src, T* dst, int64_t n) {
  vstore(dst, vload(src, n), n);
}

template <class T>
void lstm_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, T* gates, const T* c_prev,
              T* c_new, const T* h_prev, T* h_new, T* out, int64_t u0, int64_t u1) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    if (!valid(len, t, b)) {
      vcopy(c_prev + o, c_new + o, n);
      if (h_prev) {
        vcopy(h_prev + o, h_new + o, n);
      } else {
        vzero(h_new + o, n);
      }
      if (out) vzero(out + o, n);
      return;
    }
    T* g = gates + b * 4 * H;
    const auto a = math::lstm_activate(vload(g + j, n), vload(g + H + j, n),
                                       vload(g + 2 * H + j, n), vload(g + 3 * H + j, n));
    V c, h;
    math::lstm_state(a, vload(c_prev + o, n), c, h);
    vstore(g + j, a.i, n);
    vstore(g + H + j, a.f, n);
    vstore(g + 2 * H + j, a.g, n);
    vstore(g + 3 * H + j, a.o, n);
    vstore(c_new + o, c, n);
    vstore(h_new + o, h, n);
    if (out) vstore(out + o, h, n);
  }, u0, u1);
}

template <class T>
void lstm_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* gates,
              const T* c_prev, const T* c_new, const T* dh, const T* grad_out, T* dc, T* dgates,
              T* dh_next) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    T* dg = dgates + b * 4 * H;
    if (!valid(len, t, b)) {
      for (int k = 0; k < 4; ++k) vzero(dg + k * H + j, n);
      if (dh_next) vcopy(dh + o, dh_next + o, n);
      return;
    }
    const T* g = gates + b * 4 * H;
    const math::LstmGates<V> a{vload(g + j, n), vload(g + H + j, n), vload(g + 2 * H + j, n),
                               vload(g + 3 * H + j, n)};
    V dht = vload(dh + o, n);
    if (grad_out) dht = dht + vload(grad_out + o, n);
    math::LstmGates<V> d;
    V dc_prev;
    math::lstm_backward(a, vload(c_prev + o, n), vload(c_new + o, n), dht, vload(dc + o, n), d,
                        dc_prev);
    vstore(dg + j, d.i, n);
    vstore(dg + H + j, d.f, n);
    vstore(dg + 2 * H + j, d.g, n);
    vstore(dg + 3 * H + j, d.o, n);
    vstore(dc + o, dc_prev, n);
    if (dh_next) vzero(dh_next + o, n);
  });
}

template <class T>
void select(int64_t t, const int64_t* len, int64_t B, int64_t P, T* out, const T* h_prev,
            T* h_new) {
  for_each_lane_group<T>(B, P, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * P + j;
    if (valid(len, t, b)) {
      vcopy(out + o, h_new + o, n);
    } else {
      vcopy(h_prev + o, h_new + o, n);
      vzero(out + o, n);
    }
  });
}

template <class T>
void grad(int64_t t, const int64_t* len, int64_t B, int64_t P, const T* dh, const T* grad_out,
          T* dr, T* dh_next) {
  for_each_lane_group<T>(B, P, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * P + j;
    if (valid(len, t, b)) {
      auto v = vload(dh + o, n);
      if (grad_out) v = v + vload(grad_out + o, n);
      vstore(dr + o, v, n);
      vzero(dh_next + o, n);
    } else {
      vzero(dr + o, n);
      vcopy(dh + o, dh_next + o, n);
    }
  });
}

template <class T>
void gru_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* gi, const T* gh,
             const T* b_hn, const T* h_prev, T* ws, T* h_new, T* out, int64_t u0,
             int64_t u1) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    T* w = ws + b * 4 * H;
    if (!valid(len, t, b)) {
      // The workspace is an op output: defined values even where backward never reads them.
      for (int k = 0; k < 4; ++k) vzero(w + k * H + j, n);
      vcopy(h_prev + o, h_new + o, n);
      vzero(out + o, n);
      return;
    }
    const T* x = gi + b * 3 * H;
    const T* h = gh + b * 3 * H;
    const V hn = vload(h + 2 * H + j, n) + (b_hn ? vload(b_hn + j, n) : V(0));
    const auto a = math::gru_activate(vload(x + j, n), vload(x + H + j, n),
                                      vload(x + 2 * H + j, n), vload(h + j, n),
                                      vload(h + H + j, n), hn);
    const V hy = math::gru_state(a, vload(h_prev + o, n));
    vstore(w + j, a.r, n);
    vstore(w + H + j, a.z, n);
    vstore(w + 2 * H + j, a.n, n);
    vstore(w + 3 * H + j, a.hn, n);
    vstore(h_new + o, hy, n);
    vstore(out + o, hy, n);
  }, u0, u1);
}

template <class T>
void gru_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* ws, const T* h_prev,
             const T* dh, const T* grad_out, T* dgi, T* dgh, T* dh_next) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    T* di = dgi + b * 3 * H;
    T* dhh = dgh + b * 3 * H;
    if (!valid(len, t, b)) {
      for (int k = 0; k < 3; ++k) {
        vzero(di + k * H + j, n);
        vzero(dhh + k * H + j, n);
      }
      vcopy(dh + o, dh_next + o, n);
      return;
    }
    const T* w = ws + b * 4 * H;
    const math::GruGates<V> a{vload(w + j, n), vload(w + H + j, n), vload(w + 2 * H + j, n),
                              vload(w + 3 * H + j, n)};
    V dht = vload(dh + o, n);
    if (grad_out) dht = dht + vload(grad_out + o, n);
    const auto d = math::gru_backward(a, vload(h_prev + o, n), dht);
    vstore(di + j, d.r, n);
    vstore(di + H + j, d.z, n);
    vstore(di + 2 * H + j, d.in, n);
    vstore(dhh + j, d.r, n);
    vstore(dhh + H + j, d.z, n);
    vstore(dhh + 2 * H + j, d.hn, n);
    vstore(dh_next + o, d.h_direct, n);
  });
}

template <class T, bool kRelu>
void rnn_fwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* pre, const T* h_prev,
             T* h_new, T* out, int64_t u0, int64_t u1) {
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    if (!valid(len, t, b)) {
      vcopy(h_prev + o, h_new + o, n);
      vzero(out + o, n);
      return;
    }
    const auto h = math::rnn_activate<OpVec<T>, kRelu>(vload(pre + o, n));
    vstore(h_new + o, h, n);
    vstore(out + o, h, n);
  }, u0, u1);
}

template <class T, bool kRelu>
void rnn_bwd(int64_t t, const int64_t* len, int64_t B, int64_t H, const T* h_new, const T* dh,
             const T* grad_out, T* dpre, T* dh_next) {
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    if (!valid(len, t, b)) {
      vzero(dpre + o, n);
      vcopy(dh + o, dh_next + o, n);
      return;
    }
    auto dht = vload(dh + o, n);
    if (grad_out) dht = dht + vload(grad_out + o, n);
    vstore(dpre + o, math::rnn_backward<OpVec<T>, kRelu>(vload(h_new + o, n), dht), n);
    vzero(dh_next + o, n);
  });
}

template <class T>
T* p(void* x) {
  return static_cast<T*>(x);
}
template <class T>
const T* p(const void* x) {
  return static_cast<const T*>(x);
}

}  // namespace

void lstm_layer_forward_units(int64_t u0, int64_t u1, DType dtype, int64_t t,
                              const int64_t* lengths, int64_t B, int64_t H, void* gates,
                              const void* c_prev, void* c_new, const void* h_prev, void* h_new,
                              void* out) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    lstm_fwd<T>(t, lengths, B, H, p<T>(gates), p<T>(c_prev), p<T>(c_new), p<T>(h_prev),
                p<T>(h_new), p<T>(out), u0, u1);
  });
}

void lstm_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,
                              int64_t H, const void* gates, const void* c_prev, const void* c_new,
                              const void* dh, const void* grad_out, void* dc, void* dgates,
                              void* dh_next) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    lstm_bwd<T>(t, lengths, B, H, p<T>(gates), p<T>(c_prev), p<T>(c_new), p<T>(dh),
                p<T>(grad_out), p<T>(dc), p<T>(dgates), p<T>(dh_next));
  });
}

void layer_select_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,
                       void* out, const void* h_prev, void* h_new) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    select<T>(t, lengths, B, P, p<T>(out), p<T>(h_prev), p<T>(h_new));
  });
}

void layer_grad_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,
                     const void* dh, const void* grad_out, void* dr, void* dh_next) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad<T>(t, lengths, B, P, p<T>(dh), p<T>(grad_out), p<T>(dr), p<T>(dh_next));
  });
}

void gru_layer_forward_units(int64_t u0, int64_t u1, DType dtype, int64_t t,
                             const int64_t* lengths, int64_t B, int64_t H, const void* gi,
                             const void* gh, const void* b_hn, const void* h_prev, void* ws,
                             void* h_new, void* out) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gru_fwd<T>(t, lengths, B, H, p<T>(gi), p<T>(gh), p<T>(b_hn), p<T>(h_prev), p<T>(ws),
               p<T>(h_new), p<T>(out), u0, u1);
  });
}

void gru_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t H,
                             const void* ws, const void* h_prev, const void* dh,
                             const void* grad_out, void* dgi, void* dgh, void* dh_next) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gru_bwd<T>(t, lengths, B, H, p<T>(ws), p<T>(h_prev), p<T>(dh), p<T>(grad_out), p<T>(dgi),
               p<T>(dgh), p<T>(dh_next));
  });
}

void rnn_layer_forward_units(int64_t u0, int64_t u1, DType dtype, bool relu, int64_t t,
                             const int64_t* lengths, int64_t B, int64_t H, const void* pre,
                             const void* h_prev, void* h_new, void* out) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (relu) {
      rnn_fwd<T, true>(t, lengths, B, H, p<T>(pre), p<T>(h_prev), p<T>(h_new), p<T>(out), u0, u1);
    } else {
      rnn_fwd<T, false>(t, lengths, B, H, p<T>(pre), p<T>(h_prev), p<T>(h_new), p<T>(out), u0,
                        u1);
    }
  });
}

void rnn_layer_backward_step(DType dtype, bool relu, int64_t t, const int64_t* lengths, int64_t B,
                             int64_t H, const void* h_new, const void* dh, const void* grad_out,
                             void* dpre, void* dh_next) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (relu) {
      rnn_bwd<T, true>(t, lengths, B, H, p<T>(h_new), p<T>(dh), p<T>(grad_out), p<T>(dpre),
                       p<T>(dh_next));
    } else {
      rnn_bwd<T, false>(t, lengths, B, H, p<T>(h_new), p<T>(dh), p<T>(grad_out), p<T>(dpre),
                        p<T>(dh_next));
    }
  });
}

}  // namespace cpu
}  // namespace pyseqk

// ---------------------------------------------------------------------------------------------
// The recurrent GEMM of a tiny batch (B <= 2, kSmallBatch in csrc/ops/layers.cpp): a GEMV, where a
// BLAS call's fixed cost (argument checks, kernel selection, thread handoff) is about the size of
// the work (B = 1, H = 128: 65k multiply-adds, ~2 us). Single-threaded: the layers' time loop
// gives each thread of its team a column slice.
namespace pyseqk {
namespace cpu {

namespace {

using VF = at::vec::Vectorized<float>;
constexpr int64_t kLanesF = VF::size();

// C[0, q*gs + j] = sum_k a[k] B[k, q*gs + j] + beta C[...] for q < G, j < NV*L (the last vector
// only `tail` wide when kTail): broadcast-FMA over the rows of B with G x NV accumulators of
// compile-time count, so they stay in registers (a runtime-indexed array of them is kept on the
// stack: with 16-lane vectors a thread's 64-column slice took that path and the B = 1 LSTM layer
// went from 0.71 to 0.92 ms).
template <int G, int NV, bool kTail>
inline void axpy_block(const float* a, int64_t K, const float* B, int64_t ldb, int64_t gs,
                       float beta, float* c, int64_t tail) {
  VF acc[G][NV];
  for (auto& row : acc)
    for (auto& v : row) v = VF(0.f);
  auto load = [&](const float* p, int v) {
    return kTail && v == NV - 1 ? VF::loadu(p, tail) : VF::loadu(p);
  };
  for (int64_t k = 0; k < K; ++k) {
    const VF ak(a[k]);
    const float* b = B + k * ldb;
    for (int q = 0; q < G; ++q)
      for (int v = 0; v < NV; ++v)
        acc[q][v] = at::vec::fmadd(ak, load(b + q * gs + v * kLanesF, v), acc[q][v]);
  }
  for (int q = 0; q < G; ++q) {
    for (int v = 0; v < NV; ++v) {
      const int64_t n = kTail && v == NV - 1 ? tail : kLanesF;
      float* out = c + q * gs + v * kLanesF;
      VF r = acc[q][v];
      if (beta != 0.f) r = r + VF::loadu(out, n) * VF(beta);
      r.store(out, n);
    }
  }
}

template <int G, int NV>
inline void axpy_blocks(int64_t vecs, int64_t tail, const float* a, int64_t K, const float* B,
                        int64_t ldb, int64_t gs, float beta, float* c) {
  if constexpr (NV > 0) {
    if (vecs == NV) {
      return tail ? axpy_block<G, NV, true>(a, K, B, ldb, gs, beta, c, tail)
                  : axpy_block<G, NV, false>(a, K, B, ldb, gs, beta, c, 0);
    }
    axpy_blocks<G, NV - 1>(vecs, tail, a, K, B, ldb, gs, beta, c);
  }
}

// Vector registers: AVX-512 has 32, AVX2 16.
constexpr int kVecRegisters = kLanesF == 16 ? 32 : 16;

// One row: C[q*gs + n] for q < G, n < N, in blocks of as many vectors per gate (at most 8) as
// leave G x that many accumulators, the broadcast and a few loads in registers.
template <int G>
void axpy_row(int64_t N, int64_t K, const float* a, const float* B, int64_t ldb, int64_t gs,
              float beta, float* c) {
  constexpr int kVecs = std::min(8, std::max(1, (kVecRegisters - 4) / G));
  for (int64_t n0 = 0; n0 < N; n0 += kVecs * kLanesF) {
    const int64_t width = std::min(kVecs * kLanesF, N - n0);
    axpy_blocks<G, kVecs>((width + kLanesF - 1) / kLanesF, width % kLanesF, a, K, B + n0, ldb, gs,
                          beta, c + n0);
  }
}

}  // namespace

void small_gemm_gates_f32(int G, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* B, int64_t ldb, int64_t gate_stride, float beta, float* C,
                          int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    switch (G) {
      case 4: axpy_row<4>(N, K, a, B, ldb, gate_stride, beta, c); break;
      case 3: axpy_row<3>(N, K, a, B, ldb, gate_stride, beta, c); break;
      case 2: axpy_row<2>(N, K, a, B, ldb, gate_stride, beta, c); break;
      default:
        for (int q = 0; q < G; ++q) {
          axpy_row<1>(N, K, a, B + q * gate_stride, ldb, 0, beta, c + q * gate_stride);
        }
    }
  }
}

void small_gemm_f32(bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  using V = VF;
  constexpr int64_t L = kLanesF;
  if (!tb) return small_gemm_gates_f32(1, M, N, K, A, lda, B, ldb, 0, beta, C, ldc);
  // C[m, n] = dot(a, B[n, :]): four rows of B per pass, one horizontal sum per output.
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int64_t rows = std::min<int64_t>(4, N - n0);
      V acc[4] = {V(0.f), V(0.f), V(0.f), V(0.f)};
      for (int64_t k = 0; k < K; k += L) {
        const int64_t cnt = std::min(L, K - k);
        const V av = cnt == L ? V::loadu(a + k) : V::loadu(a + k, cnt);
        for (int64_t r = 0; r < rows; ++r) {
          const float* b = B + (n0 + r) * ldb + k;
          acc[r] = at::vec::fmadd(av, cnt == L ? V::loadu(b) : V::loadu(b, cnt), acc[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s = at::vec::vec_reduce_all<float>([](V x, V y) { return x + y; }, acc[r]);
        c[n0 + r] = beta != 0.f ? s + beta * c[n0 + r] : s;
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyseqk
