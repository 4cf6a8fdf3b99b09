// One fp32 layer's whole forward at one or two batch rows (kFusedSmallBatch; AVX-512 builds, no
// LSTM projection) in one thread team: fused_layer_forward (csrc/cpu/fused_layer.cpp) sends
// those batches here.
//
// Why: at B = 1 a step is two GEMVs, each a pass over a weight matrix (T = 200, I = H = 128
// LSTM: 2 x 65k multiply-adds over 2 x 256 KB). The split loop of csrc/ops/layers.cpp ran them
// as MKL's projection GEMM over all steps (its own fork), a transposed copy of W_hh per call, and
// a loop whose counting barrier and ATen accessors cost ~0.7 us a step on top of the GEMV
// (bench/NOTES.md, "Layers: one or two batch rows"). Here each thread owns a range of hidden units
// (a multiple of 16) and per step:
//   - waits for the others' step flags (one cache line each, stored once their rows of h_t are
//     written), copies h_{t-1} into its own zero-padded buffer;
//   - the hidden part: dot products of its rows of W_hh as stored (no transposed copy) with
//     h_{t-1}, 16 / B rows a block, reduced into one vector of 16 sums;
//   - the gate math on its units (along the vector lanes), its rows of h_t into the shared
//     double buffer, the outputs and workspaces row-major, then its flag;
//   - while the others finish the step: a piece of the next chunk's input parts (x W_ih^T for
//     32 / B steps at a time, the thread's rows only, 32 lanes), so that a whole chunk is ready
//     when its first step comes, and is transposed (lanes x rows) for the step math then.
// Lengths: a batch row past its length keeps its state and gets zero outputs and workspace; a
// step with no valid row skips the hidden part.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "cpu/fused_team.h"
#include "cpu/gemm.h"
#include "cpu/spin_barrier.h"
#include "cpu/vec_io.h"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cpu {
namespace fused {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

using V = at::vec::Vectorized<float>;
constexpr int kL = 16;
constexpr int64_t kLanes = kGemmBatch;  // the projection's lanes: steps x batch rows
// The smallest W_hh (elements) whose GEMV the team splits: the T = 200 RNN at H = 128
// (16k multiply-adds a step, ~0.3 us) is faster on one thread than two and their flags.
constexpr int64_t kTeamMinWeight = int64_t(1) << 15;

inline int64_t round16(int64_t n) { return (n + kL - 1) / kL * kL; }
inline __mmask16 first(int64_t n) {
  return n >= kL ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// out[i] = the sum of a[i]'s lanes, i < 16: four rounds of shuffles and adds, each halving the
// partial sums per input, then one permutation into row order.
inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [a_i | a_{i+8}], 8 partials each
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit quarters: [a_i, a_{i+8}, a_{i+4}, a_{i+12}], 4 each
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88),
                         _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // per quarter q: 2 partials of u_i's row q, 2 of u_{i+2}'s
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44),
                         _mm512_shuffle_ps(u[i], u[i + 2], 0xEE));
  }
  // Lane 4q + j: the sum of u_0, u_2, u_1, u_3's row q for j = 0..3, that is of
  // a[0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15] in lane order (an involution).
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88),
                                 _mm512_shuffle_ps(w[0], w[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, s);
}

// GEMVs on a thread's rows of a weight: out[b * ldo + g * U + u] = dot(w row (g H + u),
// v[b * ldv, + K]) for u < U, g < G, b < NB (w: W_hh or W_ih from the thread's first unit's row;
// rows of K floats, H rows a gate): 16 / NB rows a block, NB x that many accumulators. v is zero
// past K up to a multiple of 16 (w is read masked there).
template <int NB>
void dot_rows(const float* w, int64_t K, int64_t H, int64_t U, int G, const float* v,
              int64_t ldv, float* out, int64_t ldo) {
  constexpr int R = kL / NB;
  const int64_t J = K / kL;
  const __mmask16 tail = first(K % kL);
  for (int g = 0; g < G; ++g) {
    for (int64_t u0 = 0; u0 < U; u0 += R) {
      const float* wr = w + (g * H + u0) * K;
      const int64_t last = U - 1 - u0;  // rows past the end read the last one (not stored)
      __m512 acc[kL];
      for (auto& a : acc) a = _mm512_setzero_ps();
      auto step = [&](int64_t k, __mmask16 m) {
        __m512 hv[NB];
        for (int b = 0; b < NB; ++b) hv[b] = _mm512_load_ps(v + b * ldv + k);
        for (int r = 0; r < R; ++r) {
          const __m512 wv = _mm512_maskz_loadu_ps(m, wr + std::min<int64_t>(r, last) * K + k);
          for (int b = 0; b < NB; ++b) acc[b * R + r] = _mm512_fmadd_ps(wv, hv[b], acc[b * R + r]);
        }
      };
      for (int64_t j = 0; j < J; ++j) step(j * kL, 0xFFFF);
      if (tail) step(J * kL, tail);
      const __m512 s = reduce16(acc);
      const __mmask16 m = first(std::min<int64_t>(R, U - u0));
      float* o = out + g * U + u0;
      _mm512_mask_storeu_ps(o, m, s);
      if constexpr (NB == 2) _mm512_mask_storeu_ps(o + ldo, m, _mm512_shuffle_f32x4(s, s, 0xEE));
    }
  }
}

// Rows [r0, r1) of a chunk's input parts: c[r, lane] = sum_k row_ptr(r)[k] xt[k, lane] over
// kLanes lanes, 4 rows x 2 vectors of accumulators, k in order (xt and the rows in L1/L2).
template <class RowPtr>
void project_rows(const RowPtr& row_ptr, int64_t I, const float* xt, float* c, int64_t r0,
                  int64_t r1) {
  constexpr int kRows = 4;
  for (int64_t r = r0; r < r1; r += kRows) {
    const float* a[kRows];
    __m512 acc[kRows][2];
    for (int i = 0; i < kRows; ++i) {
      a[i] = row_ptr(std::min(r + i, r1 - 1));  // rows past r1: computed, not stored
      acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < I; ++k) {
      const __m512 x0 = _mm512_loadu_ps(xt + k * kLanes);
      const __m512 x1 = _mm512_loadu_ps(xt + k * kLanes + kL);
      for (int i = 0; i < kRows; ++i) {
        const __m512 w = _mm512_set1_ps(a[i][k]);
        acc[i][0] = _mm512_fmadd_ps(w, x0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(w, x1, acc[i][1]);
      }
    }
    for (int i = 0; i < kRows && r + i < r1; ++i) {
      _mm512_storeu_ps(c + (r + i) * kLanes, acc[i][0]);
      _mm512_storeu_ps(c + (r + i) * kLanes + kL, acc[i][1]);
    }
  }
}

// Per thread: its hidden units [c0, c0 + U) and buffers.
struct Slice {
  int64_t c0 = 0, U = 0;
  float* bias = nullptr;  // [G * U (+ U: the GRU's b_hn)]
  float* proj = nullptr;  // 2 x [G * U, kLanes]: the input parts of this chunk and the next
  float* lanes = nullptr; // [kLanes, G * U]: this chunk's, transposed
  float* xt = nullptr;    // [I, kLanes]: the next chunk's inputs, transposed
  float* x = nullptr;     // [B, round16(I)]: x_t, zero-padded (a short chunk's steps)
  float* hsum = nullptr;  // [B, G * U]: the hidden part of this step
  float* h = nullptr;     // [B, round16(H)]: h_{t-1}, this thread's copy, zero-padded
  float* c = nullptr;     // [B, U]: the LSTM cell state
};

template <FusedLayer::Kind kKind>
void step_math(const FusedLayer& f, Slice& sl, int64_t s, int64_t chunk_steps,
               const float* proj, float* nxt, int64_t hp) {
  constexpr int G = kKind == FusedLayer::kLstm ? 4 : kKind == FusedLayer::kGru ? 3 : 1;
  const int64_t B = f.B, H = f.H, U = sl.U, t = time_of(f, s);
  const int64_t in = f.reverse ? t : t + 1;  // the state slot written
  for (int64_t b = 0; b < B; ++b) {
    const bool valid = !f.lengths || t < f.lengths[b];
    const int64_t m = (s % chunk_steps) * B + b;  // this step's lane in the chunk
    float* out = f.out + (t * B + b) * H + sl.c0;
    float* ws = f.ws ? f.ws + (t * B + b) * 4 * H + sl.c0 : nullptr;
    for (int64_t u0 = 0; u0 < U; u0 += kL) {
      const __mmask16 mk = first(U - u0);
      const V h_prev(_mm512_maskz_loadu_ps(mk, sl.h + b * hp + sl.c0 + u0));
      float* cp = kKind == FusedLayer::kLstm ? sl.c + b * U + u0 : nullptr;
      const V c_prev = cp ? V(_mm512_maskz_loadu_ps(mk, cp)) : V(0.f);
      V h = h_prev, c = c_prev;
      auto save = [&](int g, const V& x) {
        if (ws) _mm512_mask_storeu_ps(ws + g * H + u0, mk, valid ? __m512(x) : _mm512_setzero_ps());
      };
      if (valid) {
        auto bias = [&](int64_t row) { return V(_mm512_maskz_loadu_ps(mk, sl.bias + row)); };
        auto x_part = [&](int g) {
          return V(_mm512_maskz_loadu_ps(mk, proj + m * G * U + g * U + u0));
        };
        auto h_part = [&](int g) {
          return V(_mm512_maskz_loadu_ps(mk, sl.hsum + b * G * U + g * U + u0));
        };
        // The GRU's n: its input part, then its hidden part hn (b_hn: row G * U).
        const bool gru = kKind == FusedLayer::kGru;
        auto pre = [&](int g) {
          if (gru && g == 2) return x_part(2) + bias(2 * U + u0);
          if (gru && g == 3) return h_part(2) + bias(G * U + u0);
          return x_part(g) + h_part(g) + bias(g * U + u0);
        };
        h = gate_math<kKind>(pre, save, h_prev, c);
      } else {
        for (int g = 0; g < 4 && (kKind == FusedLayer::kLstm || kKind == FusedLayer::kGru); ++g) {
          save(g, V(0.f));
        }
      }
      const int64_t col = b * H + sl.c0 + u0;
      _mm512_mask_storeu_ps(nxt + b * hp + sl.c0 + u0, mk, h);
      _mm512_mask_storeu_ps(out + u0, mk, valid ? __m512(h) : _mm512_setzero_ps());
      if (f.hs) _mm512_mask_storeu_ps(f.hs + in * B * H + col, mk, h);
      if (cp) {
        _mm512_mask_storeu_ps(cp, mk, c);
        if (f.cs) _mm512_mask_storeu_ps(f.cs + in * B * H + col, mk, c);
      }
      if (s == f.T - 1) {
        _mm512_mask_storeu_ps(f.h_n + col, mk, h);
        if (cp) _mm512_mask_storeu_ps(f.c_n + col, mk, c);
      }
    }
  }
}

// One flag per thread, each on its own line: the steps whose rows of h it has written.
struct alignas(64) StepFlag {
  std::atomic<int64_t> done{0};
};

}  // namespace

void run_small(const FusedLayer& f, int threads) {
  const int64_t T = f.T, B = f.B, I = f.I, H = f.H, hp = round16(H);
  const int G = gate_count(f.kind);
  const bool lstm = f.kind == FusedLayer::kLstm;
  const int64_t chunk = unit_chunk(H, G * H * H >= kTeamMinWeight ? threads : 1);
  const int team = team_size(H, chunk);
  const int64_t chunk_steps = kLanes / B;  // steps per projection chunk
  // h_{t-1} of even and odd steps, [B, hp] each, shared: each thread writes its units' rows.
  float* const hbuf = scratch(kShared, 2 * B * hp, true);
  TORCH_CHECK(hbuf, "pyseqk: could not allocate the fused layer's ", 2 * B * hp * 4, " bytes");
  std::unique_ptr<StepFlag[]> flags(new StepFlag[team]);
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = unit_chunk(H, nt);
    Slice sl;
    sl.c0 = std::min(H, tid * per);
    sl.U = std::min(H, sl.c0 + per) - sl.c0;
    const int64_t U = sl.U, R = G * U;
    if (U > 0) {
      sl.bias = scratch(kBias, (G + 1) * U, true);
      sl.proj = scratch(kWeights, 2 * R * kLanes, false);
      sl.lanes = scratch(kWeightsT, R * kLanes, false);
      sl.xt = scratch(kInput, I * kLanes, true);
      sl.x = scratch(kInputRow, B * round16(I), true);
      sl.hsum = scratch(kSums, B * R, false);
      sl.h = scratch(kState, B * hp, true);
      sl.c = lstm ? scratch(kCell, B * U, false) : nullptr;
      if (!sl.bias || !sl.proj || !sl.lanes || !sl.xt || !sl.x || !sl.hsum || !sl.h ||
          (lstm && !sl.c)) {
        out_of_memory.store(true);  // reported after the region; the others must not wait
        sl.U = 0;
      }
    }
    if (sl.U == 0) {
      flags[tid].done.store(T, std::memory_order_release);
    } else {
      fill_bias(f, G, sl.c0, U, U, sl.bias);
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(sl.h + b * hp, f.h0 + b * H, H * sizeof(float));
        if (lstm) std::memcpy(sl.c + b * U, f.c0 + b * H + sl.c0, U * sizeof(float));
      }
      // The input parts of chunk k's steps into proj slot k % 2: its inputs transposed, then
      // rows [r0, r1) of the thread's G * U (gate-major, each gate's rows of W_ih contiguous).
      // (Lanes past the last step keep an earlier chunk's inputs: computed, never read.)
      auto load_chunk = [&](int64_t k) {
        for (int64_t s = k * chunk_steps; s < std::min(T, (k + 1) * chunk_steps); ++s) {
          const float* x = f.x + time_of(f, s) * B * I;
          float* xt = sl.xt + (s % chunk_steps) * B;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t i = 0; i < I; ++i) xt[i * kLanes + b] = x[b * I + i];
        }
      };
      auto row_ptr = [&](int64_t r) {  // row r of the thread's G * U, gate-major
        const int64_t g = r / U;
        return f.w_ih + (g * H + sl.c0 + r - g * U) * I;
      };
      // A chunk of few steps (the last one, or all of a short sequence) gets its input parts a
      // step at a time, GEMVs like the hidden part's: 32 lanes would be mostly padding.
      auto short_chunk = [&](int64_t k) {
        return (std::min(T, (k + 1) * chunk_steps) - k * chunk_steps) * B < kLanes / 2;
      };
      if (!short_chunk(0)) {
        load_chunk(0);
        project_rows(row_ptr, I, sl.xt, sl.proj, 0, R);
      }
      const int64_t piece = (R + chunk_steps - 1) / chunk_steps;  // rows of the next chunk a step
      auto math = [&](int64_t s, const float* proj, float* nxt) {
        switch (f.kind) {
          case FusedLayer::kLstm:
            return step_math<FusedLayer::kLstm>(f, sl, s, chunk_steps, proj, nxt, hp);
          case FusedLayer::kGru:
            return step_math<FusedLayer::kGru>(f, sl, s, chunk_steps, proj, nxt, hp);
          case FusedLayer::kRnnTanh:
            return step_math<FusedLayer::kRnnTanh>(f, sl, s, chunk_steps, proj, nxt, hp);
          case FusedLayer::kRnnRelu:
            return step_math<FusedLayer::kRnnRelu>(f, sl, s, chunk_steps, proj, nxt, hp);
        }
      };
      for (int64_t s = 0; s < T; ++s) {
        const int64_t k = s / chunk_steps, p = s % chunk_steps;
        if (s > 0) {
          spin_until([&] {
            for (int o = 0; o < nt; ++o) {
              if (flags[o].done.load(std::memory_order_acquire) < s) return false;
            }
            return true;
          });
          for (int64_t b = 0; b < B; ++b) {
            const float* src = hbuf + (s & 1) * B * hp + b * hp;
            std::memcpy(sl.h + b * hp, src, H * sizeof(float));
          }
        }
        const int64_t t = time_of(f, s);
        bool any = false;
        for (int64_t b = 0; b < B; ++b) any |= !f.lengths || t < f.lengths[b];
        auto gemv = B == 1 ? dot_rows<1> : dot_rows<2>;
        if (any) gemv(f.w_hh + sl.c0 * H, H, H, U, G, sl.h, hp, sl.hsum, R);
        if (short_chunk(k)) {
          if (any) {
            const int64_t ip = round16(I);
            for (int64_t b = 0; b < B; ++b) {
              std::memcpy(sl.x + b * ip, f.x + (t * B + b) * I, I * sizeof(float));
            }
            gemv(f.w_ih + sl.c0 * I, I, H, U, G, sl.x, ip, sl.lanes + p * B * R, R);
          }
        } else if (p == 0) {
          transpose_f32(sl.proj + (k & 1) * R * kLanes, kLanes, sl.lanes, R, R, kLanes);
        }
        math(s, sl.lanes, hbuf + ((s + 1) & 1) * B * hp);
        flags[tid].done.store(s + 1, std::memory_order_release);
        // While the others finish step s: a piece of the next chunk's input parts.
        if ((k + 1) * chunk_steps < T && !short_chunk(k + 1)) {
          if (p == 0) load_chunk(k + 1);
          project_rows(row_ptr, I, sl.xt, sl.proj + ((k + 1) & 1) * R * kLanes,
                       std::min(R, p * piece), std::min(R, (p + 1) * piece));
        }
      }
    }
    release_large_scratch(/*shared=*/false);
  }
  release_large_scratch(/*shared=*/true);
  TORCH_CHECK(!out_of_memory.load(), "pyseqk: could not allocate the fused layer's per-thread "
              "scratch");
}
#endif

}  // namespace fused
}  // namespace cpu
}  // namespace pyseqk
