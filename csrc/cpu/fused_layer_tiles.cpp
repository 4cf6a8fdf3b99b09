// The fused whole-layer forward of csrc/cpu/fused_layer.cpp with its GEMMs on the AMX tile unit
// (csrc/cpu/amx.h: fp32 accuracy from six bf16 piece products), in batch rows instead of
// transposed: the tile unit takes X's rows as they are (16 batch rows x 32 k per tile) and the
// weights packed once per call, so nothing is transposed per step. Each thread owns a range of
// hidden units and keeps, per step:
//   - the gate sums [32 rows, (G + 1) * pitch] (pitch: its units rounded up to whole 16-column
//     tiles; the pad columns have zero weights and bias, so they compute zeros and are never
//     read): the input part, then the hidden part onto it (GRU: n's hidden part apart);
//   - h and c [32 rows, pitch] fp32, its own;
//   - h's pieces in the shared, double-buffered rows that every thread's hidden part reads: the
//     gate math writes h, then splits the thread's columns of it there, and arrives;
//   - after the arrive (a split barrier), the copies of its columns into the op's outputs (rows:
//     plain copies), the next step's input part, and its share of the batch rows of x_{s+3}
//     split into pieces (a shared ring of 4 slots: see kXAhead).
// Lengths: a row not valid at a step keeps its state (its pieces are written again into the next
// slot), its output and workspace are 0, and the GEMMs still cover it (the tile's rows).
// Batches of up to 16 rows use one 16-row tile of X, 17-32 two.
#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <tuple>

#include "cpu/amx.h"
#include "cpu/fused_team.h"
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
constexpr int64_t kRows = 32;  // batch rows of the buffers: two 16-row tiles
constexpr int64_t kL = 16;
constexpr int64_t kTile = amx::kTileRows;

int64_t k_blocks(int64_t k) { return (k + amx::kTileK - 1) / amx::kTileK; }

struct Slice {
  int64_t c0 = 0, c1 = 0, units = 0, pitch = 0;
  uint16_t* tiles = nullptr;  // per 16-column block of the G * pitch columns (gate-major): the
                              // w_ih part's k-blocks, then w_hh's (amx.h)
  float* bias = nullptr;      // [(G + 1) * pitch]: per gate (b_ih + b_hh), then the GRU's b_hn
  float* sums = nullptr;      // [kRows, (G + 1) * pitch]
  float* h = nullptr;         // [kRows, pitch]
  float* c = nullptr;         // [kRows, pitch] (LSTM)
};

// false: a scratch allocation failed. split: false when a weight did not split.
bool pack(const FusedLayer& f, int G, Slice& sl, bool& split) {
  const int64_t I = f.I, H = f.H, U = sl.units, P = sl.pitch, N = G * P;
  const int64_t kbi = k_blocks(I), stride = (kbi + k_blocks(H)) * amx::kPieces * amx::kTileElems;
  sl.tiles = scratch_bf16(kWeights, N / kTile * stride, false);
  float* wt = scratch(kWeightsT, std::max(I, H) * N, true);  // pad columns stay 0
  sl.bias = scratch(kBias, (G + 1) * P, true);
  sl.sums = scratch(kSums, kRows * (G + 1) * P, true);
  sl.h = scratch(kState, kRows * P, true);
  if (f.kind == FusedLayer::kLstm) sl.c = scratch(kCell, kRows * P, true);
  if (!sl.tiles || !wt || !sl.bias || !sl.sums || !sl.h ||
      (f.kind == FusedLayer::kLstm && !sl.c)) {
    return false;
  }
  // Each matrix's rows of the thread's units, transposed (k rows, gate-major columns), then
  // packed per 16-column block.
  for (const auto [w, K, k_off] : {std::tuple<const float*, int64_t, int64_t>{f.w_ih, I, 0},
                                   {f.w_hh, H, kbi * amx::kPieces * amx::kTileElems}}) {
    for (int g = 0; g < G; ++g) {
      transpose_f32(w + (g * H + sl.c0) * K, K, wt + g * P, N, U, K);
    }
    for (int64_t j = 0; j < N / kTile; ++j) {
      split &= amx::pack_tiles(wt + j * kTile, N, K, sl.tiles + j * stride + k_off);
    }
  }
  fill_bias(f, G, sl.c0, U, P, sl.bias);
  return true;
}

// The gate math of row b of one step, over the slice's units (whole vectors: the pad columns
// compute zeros). keep: the activated gates (LSTM) or r, z, n, hn (GRU) go back into the sums
// for the workspace. A run-time flag: the output with a workspace must equal the one without,
// bit for bit, and two instantiations may contract mul + add into FMAs differently.
template <FusedLayer::Kind kKind>
void row_math(Slice& sl, int64_t b, bool keep) {
  const int64_t P = sl.pitch, ldc = (gate_count(kKind) + 1) * P;
  float* const sums = sl.sums + b * ldc;
  for (int64_t u = 0; u < P; u += kL) {
    auto pre = [&](int g) { return V::loadu(sums + g * P + u) + V::loadu(sl.bias + g * P + u); };
    auto save = [&](int g, V x) {
      if (keep) x.store(sums + g * P + u);
    };
    float* const hp = sl.h + b * P + u;
    float* const cp = kKind == FusedLayer::kLstm ? sl.c + b * P + u : nullptr;
    V c = cp ? V::loadu(cp) : V(0.f);
    const V h = gate_math<kKind>(pre, save, kKind == FusedLayer::kGru ? V::loadu(hp) : V(0.f), c);
    if (cp) c.store(cp);
    h.store(hp);
  }
}

void row_math(FusedLayer::Kind kind, Slice& sl, int64_t b, bool keep) {
  switch (kind) {
    case FusedLayer::kLstm: return row_math<FusedLayer::kLstm>(sl, b, keep);
    case FusedLayer::kGru: return row_math<FusedLayer::kGru>(sl, b, keep);
    case FusedLayer::kRnnTanh: return row_math<FusedLayer::kRnnTanh>(sl, b, keep);
    case FusedLayer::kRnnRelu: return row_math<FusedLayer::kRnnRelu>(sl, b, keep);
  }
}

// U floats of src (or zeros) to dst.
inline void copy_row(float* dst, const float* src, int64_t U, bool valid) {
  if (valid) {
    std::memcpy(dst, src, U * sizeof(float));
  } else {
    std::memset(dst, 0, U * sizeof(float));
  }
}

}  // namespace

bool run_tiles(const FusedLayer& f, int threads) {
  const int64_t T = f.T, B = f.B, I = f.I, H = f.H;
  const int G = gate_count(f.kind);
  const bool lstm = f.kind == FusedLayer::kLstm, gru = f.kind == FusedLayer::kGru;
  const int64_t ws_cols = 4 * H;  // LSTM gates i, f, g, o; GRU r, z, n, hn
  const int halves = B > kTile ? 2 : 1;
  // bf16 products: x and the weights are bf16 values (their pieces 1 and 2 are 0), h is taken
  // rounded to bf16 (its piece 0) at each step.
  const int pieces = f.bf16_products ? 1 : amx::kPieces;
  // Units per thread in whole k-blocks: a thread's columns of h's pieces are whole pair-order
  // blocks (amx.h), written by it alone.
  const int64_t chunk = unit_chunk(H, threads, amx::kTileK);
  const int team = team_size(H, chunk);
  // X in k-blocks of kRows rows of 32 (amx.h): a thread's columns of h are one contiguous
  // region per piece, and a tile 1 KB in one piece (row-major rows, each thread's columns 32
  // segments of 256 bytes 512 apart, took 2.5x as long to write: RNN ~3 against ~1.2 us a step).
  constexpr int64_t kbs = kRows * amx::kTileK;
  const int64_t xps = k_blocks(I) * kbs, hps = k_blocks(H) * kbs;
  // h_{t-1}'s pieces of even and odd steps, shared (each thread writes its units' columns);
  // x_s's pieces in a ring of kXSlots, each thread splitting its rows of x_{s + kXAhead} while
  // the others finish step s (each thread splitting all of x was ~10 % of the RNN's step).
  // kXAhead: the input part of step s + 1 runs after step s's arrive, before its await, so the
  // other threads' splits of x_{s+1} must have come before their arrive of step s - 1, which
  // this thread has awaited. Pad rows and columns stay 0.
  constexpr int64_t kXSlots = 4, kXAhead = 3;
  uint16_t* const hpieces = scratch_bf16(kSharedPieces, 2 * amx::kPieces * hps, true);
  uint16_t* const xpieces = scratch_bf16(kInputPieces, kXSlots * amx::kPieces * xps, true);
  TORCH_CHECK(hpieces && xpieces, "pyseqk: could not allocate the fused layer's ",
              (2 * hps + kXSlots * xps) * amx::kPieces * 2, " bytes");
  std::atomic<bool> out_of_memory{false}, unsplit{false};
  SpinBarrier barrier;
  auto h_pieces = [&](int64_t slot) { return hpieces + slot * amx::kPieces * hps; };
  auto x_pieces = [&](int64_t s) { return xpieces + s % kXSlots * amx::kPieces * xps; };
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    Slice sl;
    sl.c0 = std::min(H, tid * chunk);
    sl.c1 = std::min(H, sl.c0 + chunk);
    sl.units = sl.c1 - sl.c0;
    sl.pitch = (sl.units + kTile - 1) / kTile * kTile;
    bool split = true;  // this thread's values all split
    if (sl.units > 0 && !pack(f, G, sl, split)) {
      // Out of memory: this thread only keeps the barriers' count; run throws after the region.
      out_of_memory.store(true);
      sl.units = 0;
    }
    const int64_t U = sl.units, P = sl.pitch, ldc = (G + 1) * P;
    // This thread's rows of x to split.
    const int64_t rchunk = (B + nt - 1) / nt;
    const int64_t xr0 = std::min(B, tid * rchunk), xr1 = std::min(B, xr0 + rchunk);
    std::optional<amx::TileConfig> tile_config;
    if (U > 0) tile_config.emplace();
    auto split_x = [&](int64_t s) {
      if (s >= T) return;
      const float* x = f.x + time_of(f, s) * B * I;
      for (int64_t b = xr0; b < xr1; ++b) {
        split &= amx::split_row(x + b * I, I, x_pieces(s) + b * amx::kTileK, kbs, xps);
      }
    };
    auto share_h = [&](int64_t slot) {
      for (int64_t b = 0; b < B; ++b) {
        split &= amx::split_row(sl.h + b * P, U,
                                h_pieces(slot) + sl.c0 / amx::kTileK * kbs + b * amx::kTileK, kbs,
                                hps);
      }
    };
    // GEMM segments: columns [0, cut) take the input and hidden parts; the GRU's n columns
    // [cut, 3 * pitch) their input part, and their hidden part apart, from column 3 * pitch.
    const int64_t cut = (gru ? 2 : G) * P, n_cols = G * P - cut;
    const int64_t kbi = k_blocks(I), kbh = k_blocks(H);
    const int64_t stride = (kbi + kbh) * amx::kPieces * amx::kTileElems;
    auto gemm = [&](int64_t col, int64_t cols, bool hidden, const uint16_t* X, float* C,
                    bool accumulate) {
      amx::gemm(sl.tiles + col / kTile * stride, cols / kTile, stride, hidden ? kbi : 0,
                hidden ? kbh : kbi, X, kbs, amx::kTileK, hidden ? hps : xps, halves, pieces, C,
                ldc, accumulate);
    };
    auto input_part = [&](int64_t s) {
      if (U == 0 || valid_rows(f, time_of(f, s)) == 0) return;
      gemm(0, cut, false, x_pieces(s), sl.sums, false);
      if (n_cols > 0) gemm(cut, n_cols, false, x_pieces(s), sl.sums + cut, false);
    };
    if (U > 0) {
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(sl.h + b * P, f.h0 + b * H + sl.c0, U * sizeof(float));
        if (lstm) std::memcpy(sl.c + b * P, f.c0 + b * H + sl.c0, U * sizeof(float));
      }
      share_h(0);
    }
    for (int64_t s = 0; s < kXAhead; ++s) split_x(s);
    barrier.wait(nt);
    input_part(0);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = time_of(f, s), in = f.reverse ? t : t + 1;  // in: the state slot written
      const uint32_t valid = valid_rows(f, t);
      const bool keep = f.ws != nullptr;
      if (U > 0) {
        if (valid != 0) {  // the hidden part: GRU r, z onto the input part, n's apart
          gemm(0, cut, true, h_pieces(s & 1), sl.sums, true);
          if (n_cols > 0) gemm(cut, n_cols, true, h_pieces(s & 1), sl.sums + 3 * P, false);
        }
        for (int64_t b = 0; b < B; ++b) {
          if (valid >> b & 1) row_math(f.kind, sl, b, keep);
        }
        share_h((s + 1) & 1);
      }
      // h_t's columns of this thread are in its slot: the others may go on once all arrived.
      const unsigned token = barrier.arrive(nt);
      if (U > 0) {
        for (int64_t b = 0; b < B; ++b) {
          const bool ok = valid >> b & 1;
          const float* h = sl.h + b * P;
          copy_row(f.out + (t * B + b) * H + sl.c0, h, U, ok);
          if (f.ws) {
            for (int g = 0; g < 4; ++g) {
              copy_row(f.ws + (t * B + b) * ws_cols + g * H + sl.c0, sl.sums + b * ldc + g * P,
                       U, ok);
            }
          }
          if (f.hs) copy_row(f.hs + (in * B + b) * H + sl.c0, h, U, true);
          if (f.cs) copy_row(f.cs + (in * B + b) * H + sl.c0, sl.c + b * P, U, true);
          if (s == T - 1) {
            copy_row(f.h_n + b * H + sl.c0, h, U, true);
            if (lstm) copy_row(f.c_n + b * H + sl.c0, sl.c + b * P, U, true);
          }
        }
        if (s + 1 < T) input_part(s + 1);
      }
      split_x(s + kXAhead);
      barrier.await(token);
    }
    if (!split) unsplit.store(true);
    release_large_scratch(/*shared=*/false);
  }
  release_large_scratch(/*shared=*/true);
  TORCH_CHECK(!out_of_memory.load(), "pyseqk: could not allocate the fused layer's per-thread "
              "scratch (its packed weights: ", G * (I + H) * 6, " bytes per hidden unit)");
  return !unsplit.load();
}
#endif

}  // namespace fused
}  // namespace cpu
}  // namespace pyseqk
