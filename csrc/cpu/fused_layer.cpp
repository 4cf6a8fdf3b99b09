// One fp32 layer's whole forward in one thread team, the input projection inside the time loop
// (AVX-512 builds, batches of kFusedMinBatch..kGemmBatch rows, no LSTM projection).
//
// Why: at B = 32, H = I = 256 the layer is GEMM-bound (LSTM: 3.4 GFLOP, ~8.5 ms at the machine's
// fp32 peak), and the split of layers.h, one projection GEMM over all steps then a loop of step
// GEMMs, costs three passes over a [T, B, 4H] buffer (13 MB, out of cache: the projection writes
// it, the step adds its sums to it, the gate kernel reads it), the bias broadcast of addmm, and a
// transpose of h_{t-1} into every thread's buffer each step. Here each step is one GEMM per thread
// with K = I + H over the weights of the thread's hidden units, [W_ih | W_hh] rows packed once
// per call (1 MB per thread at the bench shape, kept in the core's L2), against [x_t ; h_{t-1}]^T:
//   - the gate sums come out transposed ([rows, 32 lanes]: cpu::gemm_rows), so the gate math is
//     lane-wise over the batch, and the bias is one broadcast per row;
//   - h_t is written transposed straight into the next step's shared [x ; h]^T buffer (each thread
//     its own units' rows, no transpose on the critical path), and each thread transposes its
//     share of x_{t+1} into it before the step's one barrier (double-buffered by step parity);
//   - the cell state stays transposed in the thread's own buffer across steps;
//   - what leaves the loop (activated gates or GRU workspace, h, c, output) is transposed into
//     the op's row-major outputs through 16 x 16 register tiles.
// Lengths: a lane mask per step; an invalid row keeps its state (blend), its output and
// workspace are 0. The GEMM always covers all 32 lanes (the register block's width): a step with
// no valid row skips it, a partly valid one does not save work.
#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "cpu/gemm.h"
#include "cpu/spin_barrier.h"
#include "cpu/vec_io.h"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cpu {

namespace {

constexpr int64_t kLd = kGemmBatch;  // lanes of the transposed buffers (batch rows, padded)

int gate_count(FusedLayer::Kind kind) {
  switch (kind) {
    case FusedLayer::kLstm: return 4;
    case FusedLayer::kGru: return 3;
    default: return 1;
  }
}

// Hidden units per thread: a multiple of 16 (whole transpose tiles), as the other team loops.
int64_t unit_chunk(int64_t H, int threads) { return ((H + threads - 1) / threads + 15) / 16 * 16; }

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, FreeDeleter>;
Buffer aligned_floats(int64_t n, bool zero) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
  Buffer b(static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64))));
  TORCH_CHECK(b, "pyseqk: could not allocate ", bytes, " bytes for the fused layer");
  if (zero) std::memset(b.get(), 0, bytes);
  return b;
}

}  // namespace

bool fused_layer_fits(FusedLayer::Kind kind, int64_t B, int64_t I, int64_t H) {
  if (!kGemmFused || B < kFusedMinBatch || B > kLd || I < 1 || H < 1) return false;
  if (at::in_parallel_region()) return false;
  const int threads = std::max(1, at::get_num_threads());
  const int64_t units = std::min(H, unit_chunk(H, threads));
  const int64_t weight_bytes = gate_count(kind) * units * (I + H) * int64_t(sizeof(float));
  return weight_bytes <= kFusedMaxWeightBytes;
}

#if defined(CPU_CAPABILITY_AVX512)
namespace {

using V = at::vec::Vectorized<float>;
constexpr int kL = 16;

inline __mmask16 lane_mask(uint32_t valid, int v) {
  return static_cast<__mmask16>(valid >> (v * kL));
}

// Per thread: its hidden units [c0, c1), their packed weights and transposed state.
struct Slice {
  int64_t c0 = 0, c1 = 0, units = 0;
  Buffer w;     // [G * units, I + H]: rows gate-major, [w_ih row | w_hh row]
  Buffer bias;  // [G * units (+ units: GRU b_hn)]
  Buffer sums;  // [(G + 1) * units, kLd]: the gate sums, then in place what goes to ws
  Buffer c;     // [units, kLd]: the LSTM cell state, transposed
};

void pack(const FusedLayer& f, int G, Slice& sl) {
  const int64_t I = f.I, H = f.H, K = I + H, U = sl.units;
  sl.w = aligned_floats(G * U * K, false);
  sl.bias = aligned_floats((G + 1) * U, true);
  float* bias = sl.bias.get();
  for (int g = 0; g < G; ++g) {
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = g * H + sl.c0 + u;  // row of the module's weights
      float* dst = sl.w.get() + (g * U + u) * K;
      std::memcpy(dst, f.w_ih + r * I, I * sizeof(float));
      std::memcpy(dst + I, f.w_hh + r * H, H * sizeof(float));
      // GRU: n's hidden bias stays apart (n = tanh(in + r (h W_hn^T + b_hn))): row G * U + u.
      const bool hn = f.kind == FusedLayer::kGru && g == 2;
      bias[g * U + u] = (f.b_ih ? f.b_ih[r] : 0.f) + (!hn && f.b_hh ? f.b_hh[r] : 0.f);
      if (hn && f.b_hh) bias[G * U + u] = f.b_hh[r];
    }
  }
  sl.sums = aligned_floats((G + 1) * U * kLd, true);
  if (f.kind == FusedLayer::kLstm) sl.c = aligned_floats(U * kLd, true);
}

// The gate math of one step on the slice's units, lane-wise; valid: bit b set for valid rows.
// cur/nxt: this and the next step's [x ; h]^T; h_{t-1} of unit u is cur's row I + c0 + u.
void step_math(const FusedLayer& f, int G, Slice& sl, const float* cur, float* nxt,
               uint32_t valid) {
  const int64_t U = sl.units, hrow = f.I + sl.c0;
  float* s = sl.sums.get();
  const float* bias = sl.bias.get();
  auto row = [&](int64_t r, int v) { return s + r * kLd + v * kL; };
  for (int64_t u = 0; u < U; ++u) {
    for (int v = 0; v < kGemmVecs; ++v) {
      const __mmask16 m = lane_mask(valid, v);
      const V h_prev = V::loadu(cur + (hrow + u) * kLd + v * kL);
      V h;
      auto pre = [&](int g) { return V::loadu(row(g * U + u, v)) + V(bias[g * U + u]); };
      if (f.kind == FusedLayer::kLstm) {
        const auto a = math::lstm_activate(pre(0), pre(1), pre(2), pre(3));
        float* cp = sl.c.get() + u * kLd + v * kL;
        const V c_prev = V::loadu(cp);
        V c;
        math::lstm_state(a, c_prev, c, h);
        _mm512_storeu_ps(cp, _mm512_mask_blend_ps(m, c_prev, c));
        const V gates[4] = {a.i, a.f, a.g, a.o};
        for (int g = 0; g < 4; ++g) _mm512_storeu_ps(row(g * U + u, v), _mm512_maskz_mov_ps(m, gates[g]));
      } else if (f.kind == FusedLayer::kGru) {
        const V hn = V::loadu(row(3 * U + u, v)) + V(bias[3 * U + u]);
        const V zero(0.f);
        const auto a = math::gru_activate(pre(0), pre(1), pre(2), zero, zero, hn);
        h = math::gru_state(a, h_prev);
        const V ws[4] = {a.r, a.z, a.n, a.hn};
        for (int g = 0; g < 4; ++g) _mm512_storeu_ps(row(g * U + u, v), _mm512_maskz_mov_ps(m, ws[g]));
      } else if (f.kind == FusedLayer::kRnnRelu) {
        h = math::rnn_activate<V, true>(pre(0));
      } else {
        h = math::rnn_activate<V, false>(pre(0));
      }
      _mm512_storeu_ps(nxt + (hrow + u) * kLd + v * kL, _mm512_mask_blend_ps(m, h_prev, h));
    }
  }
}

void run(const FusedLayer& f, int team) {
  const int64_t T = f.T, B = f.B, I = f.I, H = f.H, K = I + H;
  const int G = gate_count(f.kind);
  const bool lstm = f.kind == FusedLayer::kLstm, gru = f.kind == FusedLayer::kGru;
  const int64_t ws_cols = 4 * H;  // LSTM gates i, f, g, o; GRU r, z, n, hn
  // [x_t ; h_{t-1}]^T of even and odd steps, shared; padding lanes stay 0.
  Buffer xh = aligned_floats(2 * K * kLd, true);
  SpinBarrier barrier;
  auto time_of = [&](int64_t s) { return f.reverse ? T - 1 - s : s; };
  auto valid_lanes = [&](int64_t t) {
    uint32_t m = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (!f.lengths || t < f.lengths[b]) m |= uint32_t(1) << b;
    }
    return m;
  };
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    Slice sl;
    const int64_t chunk = unit_chunk(H, nt);
    sl.c0 = std::min(H, tid * chunk);
    sl.c1 = std::min(H, sl.c0 + chunk);
    sl.units = sl.c1 - sl.c0;
    const int64_t U = sl.units;
    // This thread's share of x's columns, transposed into the buffers each step.
    const int64_t xchunk = (I + nt - 1) / nt;
    const int64_t x0 = std::min(I, tid * xchunk), x1 = std::min(I, x0 + xchunk);
    auto load_x = [&](int64_t s, float* buf) {
      if (x1 > x0) transpose_f32(f.x + time_of(s) * B * I + x0, I, buf + x0 * kLd, kLd, B, x1 - x0);
    };
    if (U > 0) {
      pack(f, G, sl);
      transpose_f32(f.h0 + sl.c0, H, xh.get() + (I + sl.c0) * kLd, kLd, B, U);
      if (lstm) transpose_f32(f.c0 + sl.c0, H, sl.c.get(), kLd, B, U);
    }
    if (T > 0) load_x(0, xh.get());
    barrier.wait(nt);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_of(s), in = f.reverse ? t : t + 1;  // in: the state slot written
      const float* cur = xh.get() + (s & 1) * K * kLd;
      float* nxt = xh.get() + ((s + 1) & 1) * K * kLd;
      if (U > 0) {
        const uint32_t valid = valid_lanes(t);
        float* sums = sl.sums.get();
        const float* w = sl.w.get();
        if (valid != 0) {
          if (gru) {  // r, z over [x ; h]; n's input and hidden sums apart
            gemm_rows(w, K, cur, kLd, K, sums, kLd, 2 * U, false);
            gemm_rows(w + 2 * U * K, K, cur, kLd, I, sums + 2 * U * kLd, kLd, U, false);
            gemm_rows(w + 2 * U * K + I, K, cur + I * kLd, kLd, H, sums + 3 * U * kLd, kLd, U,
                      false);
          } else {
            gemm_rows(w, K, cur, kLd, K, sums, kLd, G * U, false);
          }
        }
        step_math(f, G, sl, cur, nxt, valid);
        // Out of the loop's layout into the op's row-major outputs.
        const float* h_t = nxt + (I + sl.c0) * kLd;
        float* out = f.out + t * B * H + sl.c0;
        transpose_f32(h_t, kLd, out, H, U, B);
        for (int64_t b = 0; b < B; ++b) {
          if (!(valid >> b & 1)) std::memset(out + b * H, 0, U * sizeof(float));
        }
        if (f.ws) {
          for (int g = 0; g < 4; ++g) {
            transpose_f32(sums + g * U * kLd, kLd, f.ws + t * B * ws_cols + g * H + sl.c0, ws_cols,
                          U, B);
          }
        }
        if (f.hs) transpose_f32(h_t, kLd, f.hs + in * B * H + sl.c0, H, U, B);
        if (f.cs) transpose_f32(sl.c.get(), kLd, f.cs + in * B * H + sl.c0, H, U, B);
        if (s == T - 1) {
          transpose_f32(h_t, kLd, f.h_n + sl.c0, H, U, B);
          if (lstm) transpose_f32(sl.c.get(), kLd, f.c_n + sl.c0, H, U, B);
        }
      }
      if (s + 1 < T) load_x(s + 1, nxt);
      barrier.wait(nt);
    }
  }
}

}  // namespace

void fused_layer_forward(const FusedLayer& f) {
  const int threads = std::max(1, at::get_num_threads());
  const int64_t chunk = unit_chunk(f.H, threads);
  run(f, static_cast<int>((f.H + chunk - 1) / chunk));
}
#else
void fused_layer_forward(const FusedLayer&) {
  TORCH_CHECK(false, "pyseqk: the fused layer forward needs an AVX-512 build (fused_layer_fits)");
}
#endif

}  // namespace cpu
}  // namespace pyseqk
