// One fp32 layer's whole forward in one thread team, the input projection inside the time loop
// (AVX-512 builds, batches of kFusedMinBatch..kGemmBatch rows, no LSTM projection). On a CPU
// with the AMX tile unit, csrc/cpu/fused_layer_tiles.cpp runs instead (fused_layer_forward, at
// the end), and this one only where a value does not split into bf16 pieces or with
// PYSEQK_CPU_AMX=0. bfloat16 layers run here too on a CPU with AVX512_BF16 and no tile unit:
// the same loop on bf16 pairs (csrc/cpu/gemm_bf16.h, VDPBF16PS: twice the multiply-adds of an
// FMA per instruction), LSTM bf16 0.58x -> 0.96x of torch's oneDNN, GRU 1.33x -> 2.00x on the
// AVX-512 EPYC (bench/NOTES.md). Batches of one or two rows: csrc/cpu/fused_small.cpp.
//
// Why: at B = 32, H = I = 256 the layer is GEMM-bound (LSTM: 3.4 GFLOP, ~9 ms at the machine's
// fp32 peak), and the split of layers.h, one projection GEMM over all steps then a loop of step
// GEMMs, costs three passes over a [T, B, 4H] buffer (13 MB, out of cache: the projection writes
// it, the step adds its sums to it, the gate kernel reads it), the bias broadcast of addmm, and a
// transpose of h_{t-1} into every thread's buffer each step. Here each thread owns a range of
// hidden units and its rows of [W_ih | W_hh] (every gate's), packed once per call (1 MB per
// thread at the bench shape, kept in the core's L2; larger slices stream from L3 and still beat
// the split loop: T = 50, B = 32, H = 512 GRU 18.4 ms against 24.7, H = 1024 LSTM 91 against 93).
// Each step, per thread:
//   - the gate sums come out transposed ([rows, 32 lanes]: cpu::gemm_panels against x_t^T, then
//     h_{t-1}^T), so the gate math is lane-wise over the batch and the bias one broadcast per row;
//   - x_t^T is the thread's own (it transposes all of x_t: shared halves cost each reader ~16 KB
//     of cross-core transfers a step), h^T is shared, double-buffered by step parity: each thread
//     writes its units' rows of h_t straight from the gate math, and prefetches the others' rows
//     of h_{t-1} before its hidden part;
//   - the cell state stays transposed in the thread's own buffer across steps;
//   - a split barrier: a thread arrives once its rows of h_t are written, then transposes what
//     leaves the loop (output, workspace, h_n, c_n) into the op's row-major outputs through
//     16 x 16 register tiles, transposes x_{t+1} and runs step t+1's input part of the GEMM, and
//     only then waits for the others.
// Lengths: a lane mask per step; an invalid row keeps its state (blend), its output and
// workspace are 0. The GEMM always covers all 32 lanes (the register block's width): a step with
// no valid row skips it, a partly valid one does not save work.
#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "cpu/amx.h"
#include "cpu/fused_team.h"
#include "cpu/gemm.h"
#include "cpu/gemm_bf16.h"
#include "cpu/spin_barrier.h"
#include "cpu/vec_io.h"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cpu {

namespace {

constexpr int64_t kLd = kGemmBatch;  // lanes of the transposed buffers (batch rows, padded)

using namespace fused;

}  // namespace

bool fused_layer_fits(int64_t B, bool bf16) {
  if (!kGemmFused || B > kLd || at::in_parallel_region()) return false;
  if (!bf16 && B >= 1 && B <= kFusedSmallBatch) return true;
  const bool tiles = amx::enabled();
  return (tiles || !bf16 || has_avx512_bf16()) && B >= (tiles ? kTilesMinBatch : kFusedMinBatch);
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
  float* w = nullptr;     // [G * units, I + H], rows gate-major, [w_ih row | w_hh row], in
                          // gemm.h's panels (per GEMM segment: see pack); bf16 products: the
                          // same of bf16 pairs, [G * units, (I + 1) / 2 + (H + 1) / 2]
                          // (gemm_bf16.h)
  float* bias = nullptr;  // [G * units (+ units: GRU b_hn)]
  float* sums = nullptr;  // [(G + 1) * units, kLd]: the gate sums, then in place what goes to ws
  float* c = nullptr;     // [units, kLd]: the LSTM cell state, transposed
};

// false: a scratch allocation failed (nothing packed). pairs: bf16 pairs (gemm_bf16.h).
bool pack(const FusedLayer& f, int G, Slice& sl, bool pairs) {
  const int64_t I = f.I, H = f.H, K = I + H, U = sl.units;
  const int64_t I2 = (I + 1) / 2, K2 = I2 + (H + 1) / 2;
  sl.w = scratch(kWeights, G * U * K, false);
  sl.bias = scratch(kBias, (G + 1) * U, true);
  sl.sums = scratch(kSums, (G + 1) * U * kLd, true);
  if (f.kind == FusedLayer::kLstm) sl.c = scratch(kCell, U * kLd, true);
  if (!sl.w || !sl.bias || !sl.sums || (f.kind == FusedLayer::kLstm && !sl.c)) return false;
  float* bias = sl.bias;
  // The weight rows in panels (gemm.h), per segment of rows that one GEMM call covers: all G * U
  // rows, or the GRU's r, z rows and its n rows (whose hidden part has sums of their own).
  const int64_t cut = f.kind == FusedLayer::kGru ? 2 * U : G * U;
  for (const auto [m0, m1] : {std::pair<int64_t, int64_t>{0, cut}, {cut, G * U}}) {
    for (int64_t b0 = m0; b0 < m1; b0 += kPanelRows) {
      const int64_t rows = std::min<int64_t>(kPanelRows, m1 - b0);
      const float* src_ih[kPanelRows];
      const float* src_hh[kPanelRows];
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t g = (b0 + i) / U, r = g * H + sl.c0 + (b0 + i) % U;  // the module's row
        src_ih[i] = f.w_ih + r * I;
        src_hh[i] = f.w_hh + r * H;
      }
      if (pairs) {
        uint32_t* block = reinterpret_cast<uint32_t*>(sl.w) + b0 * K2;
        for (int64_t p = 0; p < I2; ++p)
          for (int64_t i = 0; i < rows; ++i) *block++ = bf16_pair(src_ih[i], 2 * p, I);
        for (int64_t p = 0; p < K2 - I2; ++p)
          for (int64_t i = 0; i < rows; ++i) *block++ = bf16_pair(src_hh[i], 2 * p, H);
        continue;
      }
      float* block = sl.w + b0 * K;  // written in order: k-major, a row's floats i apart
      for (int64_t k = 0; k < I; ++k)
        for (int64_t i = 0; i < rows; ++i) *block++ = src_ih[i][k];
      for (int64_t k = 0; k < H; ++k)
        for (int64_t i = 0; i < rows; ++i) *block++ = src_hh[i][k];
    }
  }
  fill_bias(f, G, sl.c0, U, U, bias);  // the GRU's b_hn: row G * U + u
  return true;
}

// The gate math of one step on the slice's units, lane-wise; valid: bit b set for valid rows.
// cur/nxt: this and the next step's h^T; h_{t-1} of unit u is cur's row c0 + u. keep: the
// activated gates (LSTM) or r, z, n, hn (GRU) go back into sums' rows for the workspace. A
// run-time flag, not a template parameter: two instantiations may contract mul + add into FMAs
// differently, and the output with a workspace must equal the one without, bit for bit.
template <FusedLayer::Kind kKind>
void step_math(Slice& sl, const float* cur, float* nxt, uint32_t valid, bool keep) {
  const int64_t U = sl.units;
  const float* bias = sl.bias;
  auto row = [&](int64_t r, int v) { return sl.sums + r * kLd + v * kL; };
  for (int64_t u = 0; u < U; ++u) {
    for (int v = 0; v < kGemmVecs; ++v) {
      const __mmask16 m = lane_mask(valid, v);
      float* hp = nxt + (sl.c0 + u) * kLd + v * kL;
      const V h_prev = V::loadu(cur + (sl.c0 + u) * kLd + v * kL);
      auto pre = [&](int g) { return V::loadu(row(g * U + u, v)) + V(bias[g * U + u]); };
      auto save = [&](int g, V x) {
        if (keep) _mm512_storeu_ps(row(g * U + u, v), _mm512_maskz_mov_ps(m, x));
      };
      float* cp = kKind == FusedLayer::kLstm ? sl.c + u * kLd + v * kL : nullptr;
      const V c_prev = cp ? V::loadu(cp) : V(0.f);
      V c = c_prev;
      const V h = gate_math<kKind>(pre, save, h_prev, c);  // GRU: pre(3) = hn
      if (cp) _mm512_storeu_ps(cp, _mm512_mask_blend_ps(m, c_prev, c));
      _mm512_storeu_ps(hp, _mm512_mask_blend_ps(m, h_prev, h));
    }
  }
}

void step_math(FusedLayer::Kind kind, Slice& sl, const float* cur, float* nxt, uint32_t valid,
               bool keep) {
  switch (kind) {
    case FusedLayer::kLstm: return step_math<FusedLayer::kLstm>(sl, cur, nxt, valid, keep);
    case FusedLayer::kGru: return step_math<FusedLayer::kGru>(sl, cur, nxt, valid, keep);
    case FusedLayer::kRnnTanh: return step_math<FusedLayer::kRnnTanh>(sl, cur, nxt, valid, keep);
    case FusedLayer::kRnnRelu: return step_math<FusedLayer::kRnnRelu>(sl, cur, nxt, valid, keep);
  }
}

// The other threads' rows of h_{t-1}^T (they wrote them in the step before), towards this core's
// L2 ahead of the hidden part: ~2-5 % of the LSTM and RNN layers at B = 32, measured when the
// input part ran in between (before the split barrier moved it ahead of the wait).
inline void prefetch_others(const float* h, int64_t H, const Slice& sl) {
  for (int64_t r = 0; r < H; ++r) {
    if (r == sl.c0) {
      r = sl.c1 - 1;
      continue;
    }
    for (int64_t l = 0; l < kLd; l += kL) {
      _mm_prefetch(reinterpret_cast<const char*>(h + r * kLd + l), _MM_HINT_T1);
    }
  }
}

void run(const FusedLayer& f, int team) {
  const int64_t T = f.T, B = f.B, I = f.I, H = f.H, K = I + H;
  const int G = gate_count(f.kind);
  const bool lstm = f.kind == FusedLayer::kLstm, gru = f.kind == FusedLayer::kGru;
  const int64_t ws_cols = 4 * H;  // LSTM gates i, f, g, o; GRU r, z, n, hn
  // A bfloat16 layer's bf16 products: its GEMMs on bf16 pairs (gemm_bf16.h), x_t^T and h_{t-1}^T
  // rounded into pairs once a step by each thread (h_{t-1} rounded to bf16 as the operand, as
  // the tile unit's path does; the state stays fp32). (Without AVX512_BF16 it is not here:
  // fused_layer_fits; the tile path's fallback for values that do not split lands here too.)
  const bool pairs = f.bf16_products && has_avx512_bf16();
  const int64_t I2 = (I + 1) / 2, H2 = (H + 1) / 2, K2 = I2 + H2;
  // h_{t-1}^T of even and odd steps, shared (each thread writes its units' rows); padding lanes
  // stay 0.
  float* const hbuf = scratch(kShared, 2 * H * kLd, true);
  TORCH_CHECK(hbuf, "pyseqk: could not allocate the fused layer's ", 2 * H * kLd * 4, " bytes");
  std::atomic<bool> out_of_memory{false};
  SpinBarrier barrier;
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    Slice sl;
    const int64_t chunk = unit_chunk(H, nt);
    sl.c0 = std::min(H, tid * chunk);
    sl.c1 = std::min(H, sl.c0 + chunk);
    sl.units = sl.c1 - sl.c0;
    // x_t^T, this thread's own: read from the input by each thread (shared halves cost each
    // reader ~16 KB a step in cross-core transfers).
    float* const xt = scratch(kInput, I * kLd, true);
    // Their bf16 pairs (bf16 products), this thread's own.
    auto pair_scratch = [&](ScratchUse use, int64_t n) {
      return pairs ? reinterpret_cast<uint32_t*>(scratch(use, n, true)) : nullptr;
    };
    uint32_t* const xp = pair_scratch(kInputRow, I2 * kLd);
    uint32_t* const hp = pair_scratch(kState, H2 * kLd);
    if (sl.units > 0 && (!xt || (pairs && (!xp || !hp)) || !pack(f, G, sl, pairs))) {
      // Out of memory: this thread only keeps the barriers' count; run throws after the region.
      out_of_memory.store(true);
      sl.units = 0;
    }
    const int64_t U = sl.units;
    auto load_x = [&](int64_t s) {
      transpose_f32(f.x + time_of(f, s) * B * I, I, xt, kLd, B, I);
      if (pairs) to_pairs(xt, I, kLd, xp);
    };
    // Rows [m0, m0 + M) of the slice's sums (C, kLd apart) (+)= their input part (hidden:
    // false) or hidden part (h^T: h_{t-1}, transposed).
    auto gemm = [&](int64_t m0, int64_t M, bool hidden, const float* h, float* C, bool acc) {
      if (pairs) {
        gemm_panels_bf16(reinterpret_cast<const uint32_t*>(sl.w) + m0 * K2, M, K2,
                         hidden ? I2 : 0, hidden ? H2 : I2, hidden ? hp : xp, kLd, C, kLd, acc);
      } else {
        gemm_panels(sl.w + m0 * K, M, K, hidden ? I : 0, hidden ? H : I, hidden ? h : xt, kLd, C,
                    kLd, acc);
      }
    };
    if (U > 0) {
      transpose_f32(f.h0 + sl.c0, H, hbuf + sl.c0 * kLd, kLd, B, U);
      if (lstm) transpose_f32(f.c0 + sl.c0, H, sl.c, kLd, B, U);
      load_x(0);
    }
    // Step s's input part of the gate sums (no other thread's results needed): for s = 0 here,
    // then each one while the other threads finish the step before.
    auto input_part = [&](int64_t s) {
      if (U == 0 || valid_rows(f, time_of(f, s)) == 0) return;
      if (gru) {
        gemm(0, 2 * U, false, nullptr, sl.sums, false);
        gemm(2 * U, U, false, nullptr, sl.sums + 2 * U * kLd, false);
      } else {
        gemm(0, G * U, false, nullptr, sl.sums, false);
      }
    };
    input_part(0);
    barrier.wait(nt);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_of(f, s), in = f.reverse ? t : t + 1;  // in: the state slot written
      const float* cur = hbuf + (s & 1) * H * kLd;
      float* nxt = hbuf + ((s + 1) & 1) * H * kLd;
      const uint32_t valid = valid_rows(f, t);
      float* const sums = sl.sums;
      if (U > 0) {
        if (valid != 0) {  // the hidden part: GRU r, z onto the input part, n's apart
          if (pairs) {
            to_pairs(cur, H, kLd, hp);
          } else {
            prefetch_others(cur, H, sl);
          }
          gemm(0, (gru ? 2 : G) * U, true, cur, sums, true);
          if (gru) gemm(2 * U, U, true, cur, sums + 3 * U * kLd, false);
        }
        step_math(f.kind, sl, cur, nxt, valid, f.ws != nullptr);
      }
      // h_t's rows of this thread are in nxt: the others may go on once all have arrived.
      const unsigned token = barrier.arrive(nt);
      if (U > 0) {
        // Out of the loop's layout into the op's row-major outputs.
        const float* h_t = nxt + sl.c0 * kLd;
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
        if (f.cs) transpose_f32(sl.c, kLd, f.cs + in * B * H + sl.c0, H, U, B);
        if (s == T - 1) {
          transpose_f32(h_t, kLd, f.h_n + sl.c0, H, U, B);
          if (lstm) transpose_f32(sl.c, kLd, f.c_n + sl.c0, H, U, B);
        }
        if (s + 1 < T) {
          load_x(s + 1);
          input_part(s + 1);
        }
      }
      barrier.await(token);
    }
    release_large_scratch(/*shared=*/false);
  }
  release_large_scratch(/*shared=*/true);
  TORCH_CHECK(!out_of_memory.load(), "pyseqk: could not allocate the fused layer's per-thread "
              "scratch (its packed weights: ", G * (I + H) * 4, " bytes per hidden unit)");
}

}  // namespace

void fused_layer_forward(const FusedLayer& f) {
  if (f.H == 0) return;  // every output and workspace is empty
  const int threads = std::max(1, at::get_num_threads());
  if (f.B <= kFusedSmallBatch && !f.bf16_products) return run_small(f, threads);
  if (amx::enabled() && run_tiles(f, threads)) return;
  // (A bf16 layer whose values did not split, inf or NaN, lands here too: on bf16 pairs, as
  // every CPU with the tile unit has AVX512_BF16.)
  run(f, team_size(f.H, unit_chunk(f.H, threads)));
}
#else
void fused_layer_forward(const FusedLayer&) {
  TORCH_CHECK(false, "pyseqk: the fused layer forward needs an AVX-512 build (fused_layer_fits)");
}
#endif

}  // namespace cpu
}  // namespace pyseqk
