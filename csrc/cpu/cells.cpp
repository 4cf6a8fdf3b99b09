// Fused pointwise parts of the RNN/LSTM/GRU cells on the CPU: bias, activations, state update,
// and their backward, vectorized with at::vec and split over the two cores with at::parallel_for.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/vec_io.h"
#include "pyseqk/cell_kernels.h"

namespace pyseqk {
namespace cpu {
namespace {

// One 16 x 16 tile. ATen's transpose_mxn<float> takes the tile size at run time, and its
// register array then lives on the stack (a 512 x 128 matrix took ~40 us); here the sizes are
// constants and flatten inlines the whole shuffle network.
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((flatten)) inline void transpose_16x16(const float* src, int64_t ld_src, float* dst,
                                                     int64_t ld_dst) {
  at::vec::VectorizedN<float, 16> tile;
  for (int i = 0; i < 16; ++i) tile[i] = _mm512_loadu_ps(src + i * ld_src);
  at::vec::transpose_block(tile);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, tile[i]);
}
#else
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
}
#endif

// dst[c, r] = src[r, c] for r < rows, c < cols (both at most 16).
inline void transpose_tile(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                           int64_t rows, int64_t cols) {
  if (rows == 16 && cols == 16) {
    transpose_16x16(src, ld_src, dst, ld_dst);
  } else {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(rows),
                                  static_cast<int>(cols));
  }
}

// Rows [k*H + j0, k*H + j1) of st's sums for k < gates (gate k's columns of ws), when the kernel
// computes them (st.ready false): w_ih x^T (+ w_hh h^T), or, stacked (GRU: gates = 6), the first
// gates/2 from w_ih x^T and the rest from w_hh h^T.
inline void step_sums_rows(const StepSums& st, int64_t gates, bool stacked, int64_t H, int64_t j0,
                           int64_t j1) {
  const int64_t I = st.I, B = st.B, ld = st.ld, rows = j1 - j0;
  TORCH_INTERNAL_ASSERT(ld == kGemmBatch, "pyseqk: StepSums.ld must be cpu::kGemmBatch");
  // This thread's own [x | h]^T ([I + H, ld]; the padding columns past B keep whatever an earlier
  // call left there: columns are independent, and their sums are never read): a copy written by
  // one core and read by the other cost the reader ~15 us a step in cache-line transfers.
  thread_local std::vector<float> xt_buffer;
  xt_buffer.resize((I + H) * ld);
  float* xt = xt_buffer.data();
  float* xt_h = xt + I * ld;
  transpose_f32(st.x, I, xt, ld, B, I);
  transpose_f32(st.h, H, xt_h, ld, B, H);
  if (ld > B) {
    for (int64_t k = 0; k < I + H; ++k) std::fill(xt + k * ld + B, xt + (k + 1) * ld, 0.f);
  }
  for (int64_t k = 0; k < gates; ++k) {
    float* c = st.sums + (k * H + j0) * ld;
    if (stacked && k >= gates / 2) {
      gemm_rows(st.w_hh + ((k - gates / 2) * H + j0) * H, H, xt_h, ld, H, c, ld, rows, false);
      continue;
    }
    gemm_rows(st.w_ih + (k * H + j0) * I, I, xt, ld, I, c, ld, rows, false);
    if (!stacked) gemm_rows(st.w_hh + (k * H + j0) * H, H, xt_h, ld, H, c, ld, rows, true);
  }
}

// Runs fn(b, j, n) over every row b < B and lane group [j, j+n) of H like for_each_lane_group,
// for a kernel whose input ws [B, ld] (gate k's sums in columns [k*H, (k+1)*H), k < gates) is in
// place already (st == nullptr) or comes as a StepSums, transposed. Then each task owns 16
// columns of every gate at a time: it computes their sums (unless ready), and for each block of
// 16 rows moves the tiles into ws through registers and runs fn on the rows while they sit in L1.
template <class T, class Fn>
void for_each_lane_group_staged(const StepSums* st, T* ws, int64_t ld, int64_t gates, bool stacked,
                                int64_t B, int64_t H, const Fn& fn) {
  if constexpr (std::is_same_v<T, float>) {
    if (st) {
      constexpr int64_t kTile = 16, L = kLanes<float>;
      const int64_t col_tiles = (H + kTile - 1) / kTile;
      // ~256 lane groups a task, as for_each_lane_group; a task computing its sums owns a
      // G * 16 x K block of weights per tile besides.
      const int64_t grain = std::max<int64_t>(1, 256 * L / (kTile * std::max<int64_t>(B, 1)));
      at::parallel_for(0, col_tiles, grain, [&](int64_t begin, int64_t end) {
        if (!st->ready) {
          step_sums_rows(*st, gates, stacked, H, begin * kTile, std::min(H, end * kTile));
        }
        for (int64_t ct = begin; ct < end; ++ct) {
          const int64_t j0 = ct * kTile, nc = std::min(kTile, H - j0);
          for (int64_t b0 = 0; b0 < B; b0 += kTile) {
            const int64_t nb = std::min(kTile, B - b0);
            for (int64_t k = 0; k < gates; ++k) {
              transpose_tile(st->sums + (k * H + j0) * st->ld + b0, st->ld,
                             ws + b0 * ld + k * H + j0, ld, nc, nb);
            }
            for (int64_t b = b0; b < b0 + nb; ++b)
              for (int64_t j = j0; j < j0 + nc; j += L) fn(b, j, std::min(L, j0 + nc - j));
          }
        }
      });
      return;
    }
  }
  TORCH_CHECK(st == nullptr, "pyseqk: transposed gate sums are float32 only");
  for_each_lane_group<T>(B, H, fn);
}

template <class F>
void dispatch(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

template <class T>
void lstm_fwd(T* ws, const T* b_ih, const T* b_hh, const T* cx, T* hy, T* cy, int64_t B,
              int64_t H, const StepSums* sums) {
  using V = OpVec<T>;
  for_each_lane_group_staged(sums, ws, 4 * H, 4, false, B, H, [&](int64_t b, int64_t j,
                                                                 int64_t n) {
    T* g = ws + b * 4 * H;
    V pre[4];
    for (int k = 0; k < 4; ++k) pre[k] = vload(g + k * H + j, n) + vbias(b_ih, b_hh, k * H + j, n);
    const auto a = math::lstm_activate(pre[0], pre[1], pre[2], pre[3]);
    V c, h;
    math::lstm_state(a, vload(cx + b * H + j, n), c, h);
    vstore(g + j, a.i, n);
    vstore(g + H + j, a.f, n);
    vstore(g + 2 * H + j, a.g, n);
    vstore(g + 3 * H + j, a.o, n);
    vstore(cy + b * H + j, c, n);
    vstore(hy + b * H + j, h, n);
  });
}

template <class T>
void lstm_bwd(const T* ws, const T* cx, const T* cy, const T* dhy, const T* dcy, T* dgates, T* dcx,
              int64_t B, int64_t H) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const T* g = ws + b * 4 * H;
    math::LstmGates<V> a{vload(g + j, n), vload(g + H + j, n), vload(g + 2 * H + j, n),
                         vload(g + 3 * H + j, n)};
    const int64_t o = b * H + j;
    const V dh = dhy ? vload(dhy + o, n) : V(0);
    const V dc = dcy ? vload(dcy + o, n) : V(0);
    math::LstmGates<V> d;
    V dc_prev;
    math::lstm_backward(a, vload(cx + o, n), vload(cy + o, n), dh, dc, d, dc_prev);
    T* dg = dgates + b * 4 * H;
    vstore(dg + j, d.i, n);
    vstore(dg + H + j, d.f, n);
    vstore(dg + 2 * H + j, d.g, n);
    vstore(dg + 3 * H + j, d.o, n);
    vstore(dcx + o, dc_prev, n);
  });
}

template <class T>
void gru_fwd(T* ws, const T* b_ih, const T* b_hh, const T* hx, T* hy, int64_t B, int64_t H,
             const StepSums* sums) {
  using V = OpVec<T>;
  for_each_lane_group_staged(sums, ws, 6 * H, 6, true, B, H, [&](int64_t b, int64_t j,
                                                                int64_t n) {
    T* g = ws + b * 6 * H;
    auto bias = [&](const T* p, int64_t k) { return p ? vload(p + k, n) : V(0); };
    const V ir = vload(g + j, n) + bias(b_ih, j);
    const V iz = vload(g + H + j, n) + bias(b_ih, H + j);
    const V in = vload(g + 2 * H + j, n) + bias(b_ih, 2 * H + j);
    const V hr = vload(g + 3 * H + j, n) + bias(b_hh, j);
    const V hz = vload(g + 4 * H + j, n) + bias(b_hh, H + j);
    const V hn = vload(g + 5 * H + j, n) + bias(b_hh, 2 * H + j);
    const auto a = math::gru_activate(ir, iz, in, hr, hz, hn);
    vstore(hy + b * H + j, math::gru_state(a, vload(hx + b * H + j, n)), n);
    vstore(g + j, a.r, n);
    vstore(g + H + j, a.z, n);
    vstore(g + 2 * H + j, a.n, n);
    vstore(g + 3 * H + j, a.hn, n);
  });
}

template <class T>
void gru_bwd(const T* ws, const T* hx, const T* dhy, T* dgi, T* dgh, T* dh_direct, int64_t B,
             int64_t H) {
  using V = OpVec<T>;
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const T* g = ws + b * 6 * H;
    const math::GruGates<V> a{vload(g + j, n), vload(g + H + j, n), vload(g + 2 * H + j, n),
                              vload(g + 3 * H + j, n)};
    const int64_t o = b * H + j;
    const auto d = math::gru_backward(a, vload(hx + o, n), vload(dhy + o, n));
    T* di = dgi + b * 3 * H;
    T* dh = dgh + b * 3 * H;
    vstore(di + j, d.r, n);
    vstore(di + H + j, d.z, n);
    vstore(di + 2 * H + j, d.in, n);
    vstore(dh + j, d.r, n);
    vstore(dh + H + j, d.z, n);
    vstore(dh + 2 * H + j, d.hn, n);
    vstore(dh_direct + o, d.h_direct, n);
  });
}

template <class T, bool kRelu>
void rnn_fwd(T* hy, const T* b_ih, const T* b_hh, int64_t B, int64_t H, const StepSums* sums) {
  for_each_lane_group_staged(sums, hy, H, 1, false, B, H, [&](int64_t b, int64_t j, int64_t n) {
    T* p = hy + b * H + j;
    vstore(p, math::rnn_activate<OpVec<T>, kRelu>(vload(p, n) + vbias(b_ih, b_hh, j, n)), n);
  });
}

template <class T, bool kRelu>
void rnn_bwd(const T* hy, const T* dhy, T* dpre, int64_t B, int64_t H) {
  for_each_lane_group<T>(B, H, [&](int64_t b, int64_t j, int64_t n) {
    const int64_t o = b * H + j;
    vstore(dpre + o, math::rnn_backward<OpVec<T>, kRelu>(vload(hy + o, n), vload(dhy + o, n)), n);
  });
}

// out[b, r] = sum_k x[b, k] w[r, k] + sum_k h[b, k] u[r, k] for B <= kMaxSmallBatch rows: the
// gate sums of a small batch. ATen's GEMM treats this as a GEMM with one or two rows and reaches
// ~16 GFLOP/s; the work is streaming the weights (2 FLOPs per 4 bytes), so read each weight row
// once for every batch row, a block of kRows rows at a time, and accumulate in registers.
template <int NB>
void small_batch_gates_impl(const float* x, const float* w, int64_t I, const float* h,
                            const float* u, int64_t H, float* out, int64_t ldo, int64_t N) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t L = V::size();
  constexpr int kRows = NB == 1 ? 4 : (NB == 2 ? 4 : 2);
  auto accumulate = [&](V (&acc)[kRows][NB], const float* a, const float* wr, int64_t K,
                        int64_t r0, int rows) {
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      V av[NB];
      for (int b = 0; b < NB; ++b) av[b] = V::loadu(a + b * K + k);
      for (int r = 0; r < rows; ++r) {
        const V wv = V::loadu(wr + (r0 + r) * K + k);
        for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wv, av[b], acc[r][b]);
      }
    }
    if (k < K) {
      const int64_t n = K - k;
      V av[NB];
      for (int b = 0; b < NB; ++b) av[b] = V::loadu(a + b * K + k, n);
      for (int r = 0; r < rows; ++r) {
        const V wv = V::loadu(wr + (r0 + r) * K + k, n);
        for (int b = 0; b < NB; ++b) acc[r][b] = at::vec::fmadd(wv, av[b], acc[r][b]);
      }
    }
  };
  // ~64k multiply-adds per task: below that one thread is faster than the fork.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (I + H) * NB * kRows));
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, N - r0));
      V acc[kRows][NB];
      for (int r = 0; r < kRows; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = V(0.0f);
      accumulate(acc, x, w, I, r0, rows);
      accumulate(acc, h, u, H, r0, rows);
      for (int r = 0; r < rows; ++r)
        for (int b = 0; b < NB; ++b)
          out[b * ldo + r0 + r] = at::vec::vec_reduce_all<float>(
              [](V p, V q) { return p + q; }, acc[r][b]);
    }
  });
}

}  // namespace

bool small_batch_gates(DType dtype, const void* x, const void* w_ih, int64_t I, const void* h,
                       const void* w_hh, int64_t H, void* out, int64_t ldo, int64_t B,
                       int64_t N) {
  if (dtype != DType::kFloat32 || B < 1 || B > kMaxSmallBatch) return false;
  auto f = [&](auto nb) {
    small_batch_gates_impl<decltype(nb)::value>(
        static_cast<const float*>(x), static_cast<const float*>(w_ih), I,
        static_cast<const float*>(h), static_cast<const float*>(w_hh), H, static_cast<float*>(out),
        ldo, N);
  };
  switch (B) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
  return true;
}

void lstm_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh, const void* cx,
                       void* hy, void* cy, int64_t B, int64_t H, const StepSums* sums) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    lstm_fwd<T>(static_cast<T*>(ws), static_cast<const T*>(b_ih), static_cast<const T*>(b_hh),
                static_cast<const T*>(cx), static_cast<T*>(hy), static_cast<T*>(cy), B, H, sums);
  });
}

void lstm_cell_backward(DType dtype, const void* ws, const void* cx, const void* cy,
                        const void* dhy, const void* dcy, void* dgates, void* dcx, int64_t B,
                        int64_t H) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    lstm_bwd<T>(static_cast<const T*>(ws), static_cast<const T*>(cx), static_cast<const T*>(cy),
                static_cast<const T*>(dhy), static_cast<const T*>(dcy), static_cast<T*>(dgates),
                static_cast<T*>(dcx), B, H);
  });
}

void gru_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh, const void* hx,
                      void* hy, int64_t B, int64_t H, const StepSums* sums) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gru_fwd<T>(static_cast<T*>(ws), static_cast<const T*>(b_ih), static_cast<const T*>(b_hh),
               static_cast<const T*>(hx), static_cast<T*>(hy), B, H, sums);
  });
}

void gru_cell_backward(DType dtype, const void* ws, const void* hx, const void* dhy, void* dgi,
                       void* dgh, void* dh_direct, int64_t B, int64_t H) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    gru_bwd<T>(static_cast<const T*>(ws), static_cast<const T*>(hx), static_cast<const T*>(dhy),
               static_cast<T*>(dgi), static_cast<T*>(dgh), static_cast<T*>(dh_direct), B, H);
  });
}

void rnn_cell_forward(DType dtype, bool relu, void* hy, const void* b_ih, const void* b_hh,
                      int64_t B, int64_t H, const StepSums* sums) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* h = static_cast<T*>(hy);
    auto* bi = static_cast<const T*>(b_ih);
    auto* bh = static_cast<const T*>(b_hh);
    relu ? rnn_fwd<T, true>(h, bi, bh, B, H, sums) : rnn_fwd<T, false>(h, bi, bh, B, H, sums);
  });
}

void rnn_cell_backward(DType dtype, bool relu, const void* hy, const void* dhy, void* dpre,
                       int64_t B, int64_t H) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* h = static_cast<const T*>(hy);
    auto* g = static_cast<const T*>(dhy);
    auto* d = static_cast<T*>(dpre);
    relu ? rnn_bwd<T, true>(h, g, d, B, H) : rnn_bwd<T, false>(h, g, d, B, H);
  });
}

void transpose_f32(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
                   int64_t cols, bool accumulate) {
  // 16 x 16 tiles through registers (AVX-512; a plain loop elsewhere), ~256 tiles per task. The
  // inner loop walks along 16 rows of dst, so the stores form 16 sequential streams: walking
  // along src instead (128 streams of 64 bytes for a 128-column dst) took 22 us for 512 x 128.
  constexpr int64_t kTile = 16;
  const int64_t col_tiles = (cols + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / (kTile * std::max<int64_t>(rows, 1)));
  at::parallel_for(0, col_tiles, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kTile * kTile];
    for (int64_t ct = begin; ct < end; ++ct) {
      const int64_t c0 = ct * kTile, nc = std::min(kTile, cols - c0);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int64_t nr = std::min(kTile, rows - r0);
        const float* s = src + r0 * ld_src + c0;
        float* d = dst + c0 * ld_dst + r0;
        if (!accumulate) {
          transpose_tile(s, ld_src, d, ld_dst, nr, nc);
          continue;
        }
        transpose_tile(s, ld_src, tile, kTile, nr, nc);
        for (int64_t c = 0; c < nc; ++c) {
          for (int64_t i = 0; i < nr; i += FVec::size()) {
            const int64_t n = std::min<int64_t>(FVec::size(), nr - i);
            float* p = d + c * ld_dst + i;
            (FVec::loadu(p, n) + FVec::loadu(tile + c * kTile + i, n)).store(p, n);
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace pyseqk
