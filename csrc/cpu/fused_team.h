// What the two fused whole-layer forwards share (csrc/cpu/fused_layer.cpp on FMAs, transposed;
// csrc/cpu/fused_layer_tiles.cpp on the AMX tile unit, batch rows): the team's split of the
// hidden units and the per-thread scratch kept across calls.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "pyseqk/cell_math.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace cpu {
namespace fused {

inline int gate_count(FusedLayer::Kind kind) {
  switch (kind) {
    case FusedLayer::kLstm: return 4;
    case FusedLayer::kGru: return 3;
    default: return 1;
  }
}

// Hidden units per thread: a multiple of `multiple` (16: whole transpose tiles, as the other team
// loops; 32: whole k-blocks of the tile unit), and the team that covers H with them.
inline int64_t unit_chunk(int64_t H, int threads, int64_t multiple = 16) {
  return ((H + threads - 1) / threads + multiple - 1) / multiple * multiple;
}
inline int team_size(int64_t H, int64_t chunk) { return static_cast<int>((H + chunk - 1) / chunk); }

// The time index of loop step s.
inline int64_t time_of(const FusedLayer& f, int64_t s) { return f.reverse ? f.T - 1 - s : s; }

// Bit b set for the batch rows valid at time t.
inline uint32_t valid_rows(const FusedLayer& f, int64_t t) {
  uint32_t m = 0;
  for (int64_t b = 0; b < f.B; ++b) {
    if (!f.lengths || t < f.lengths[b]) m |= uint32_t(1) << b;
  }
  return m;
}

// The bias of units [c0, c0 + U) per gate, pitch apart (b_ih + b_hh; the GRU's n keeps b_hn
// apart, n = tanh(in + r (h W_hn^T + b_hn)), after the G gates).
inline void fill_bias(const FusedLayer& f, int G, int64_t c0, int64_t U, int64_t pitch,
                      float* bias) {
  for (int g = 0; g < G; ++g) {
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = g * f.H + c0 + u;
      const bool hn = f.kind == FusedLayer::kGru && g == 2;
      bias[g * pitch + u] = (f.b_ih ? f.b_ih[r] : 0.f) + (!hn && f.b_hh ? f.b_hh[r] : 0.f);
      if (hn && f.b_hh) bias[G * pitch + u] = f.b_hh[r];
    }
  }
}

// The gate math of one vector (of units or of batch rows) in the three forwards: pre(g), gate g's
// sums with their bias (GRU: pre(2) n's input part, pre(3) its hidden part hn), save(g, x) the
// workspace's gate g (LSTM i, f, g, o; GRU r, z, n, hn); c: the LSTM's cell state, c_{t-1} in,
// c_t out. Returns h_t. (V's math::Act: csrc/cpu/vec_io.h.)
template <FusedLayer::Kind kKind, class V, class Pre, class Save>
inline V gate_math(const Pre& pre, const Save& save, const V& h_prev, V& c) {
  if constexpr (kKind == FusedLayer::kLstm) {
    const auto a = math::lstm_activate(pre(0), pre(1), pre(2), pre(3));
    V h, c_t;
    math::lstm_state(a, c, c_t, h);
    c = c_t;
    save(0, a.i);
    save(1, a.f);
    save(2, a.g);
    save(3, a.o);
    return h;
  } else if constexpr (kKind == FusedLayer::kGru) {
    const V zero(0.f);
    const auto a = math::gru_activate(pre(0), pre(1), pre(2), zero, zero, pre(3));
    save(0, a.r);
    save(1, a.z);
    save(2, a.n);
    save(3, a.hn);
    return math::gru_state(a, h_prev);
  } else {
    return math::rnn_activate<V, kKind == FusedLayer::kRnnRelu>(pre(0));
  }
}

// Scratch of the calling thread, kept across calls for each use (the OpenMP team's threads
// persist): a fresh allocation of the 1 MB weight slice each call is an mmap whose first touch
// page-faults; zeroed when asked. Slots past kKeptScratchBytes are freed after the call
// (release_large_scratch): a weight slice of H = 1024 is 16 MB per thread. The shared uses are
// the calling thread's buffers that the whole team reads.
enum ScratchUse {
  kWeights, kWeightsT, kBias, kSums, kCell, kState, kInput, kInputRow,  // each thread's own
  kShared, kSharedPieces, kInputPieces,                                 // shared
  kScratchUses
};
constexpr int64_t kKeptScratchBytes = int64_t(4) << 20;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
struct ScratchSlot {
  std::unique_ptr<float, FreeDeleter> p;
  int64_t capacity = 0;
};
inline thread_local ScratchSlot scratch_slots[kScratchUses];

// shared: also the shared uses, which the team reads until the parallel region ends (the calling
// thread releases them after; inside the region another thread may still be reading them).
inline void release_large_scratch(bool shared) {
  for (int use = 0; use < kScratchUses; ++use) {
    ScratchSlot& slot = scratch_slots[use];
    if ((shared || use < kShared) && slot.capacity * int64_t(sizeof(float)) > kKeptScratchBytes) {
      slot.p.reset();
      slot.capacity = 0;
    }
  }
}

// n floats; nullptr when the allocation fails: the team's threads must not throw inside the
// parallel region (that terminates the process); the forward reports it after the region.
inline float* scratch(ScratchUse use, int64_t n, bool zero) {
  ScratchSlot& slot = scratch_slots[use];
  if (slot.capacity < n || !slot.p) {  // (n = 0, an empty input: still a pointer, not "failed")
    const size_t elems = static_cast<size_t>(std::max<int64_t>(n, 1));
    const size_t bytes = (elems * sizeof(float) + 63) / 64 * 64;
    slot.p.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    slot.capacity = slot.p ? n : 0;
    if (!slot.p) return nullptr;
  }
  if (zero) std::memset(slot.p.get(), 0, n * sizeof(float));
  return slot.p.get();
}

// The forward on the AMX tile unit (csrc/cpu/fused_layer_tiles.cpp; AVX-512 builds on a CPU
// with it: amx::enabled()), in a team of up to `threads`. false: a value did not split into bf16 pieces (inf,
// NaN, beyond bf16's range: amx.h), and the outputs are not to be used: the caller runs the FMA
// forward instead.
bool run_tiles(const FusedLayer& f, int threads);

// The forward at B <= kFusedSmallBatch (csrc/cpu/fused_small.cpp; AVX-512 builds), in a team of
// up to `threads`.
void run_small(const FusedLayer& f, int threads);

// n bf16 (as uint16_t) in a float slot.
inline uint16_t* scratch_bf16(ScratchUse use, int64_t n, bool zero) {
  return reinterpret_cast<uint16_t*>(scratch(use, (n + 1) / 2, zero));
}

}  // namespace fused
}  // namespace cpu
}  // namespace pyseqk
