// A register-blocked fp32 GEMM for the recurrent kernels' step shape: the gate sums of a batch
// of up to kGemmBatch rows, computed transposed,
//   C[m, b] (+)= sum_k A[m, k] Xt[k, b]     A: weight rows [M, K] as stored, Xt: [K, ldx] (the
//                                           inputs transposed, columns padded to whole vectors)
// single-threaded, so that a kernel's own parallel loop runs it on the rows it owns and goes
// straight on to the gate math of those rows (one fork per step, no BLAS call overhead, no
// pass over the sums in between).
//
// The micro-kernel keeps an R x NV block of C in registers (NV vectors across the batch, R weight
// rows) and walks k: per k it loads NV vectors of Xt and broadcasts R weights, R * NV FMAs
// against R + NV loads. With 32 vector registers (AVX-512) and B = 32 (NV = 2), R = 14: 28 FMAs
// per 16 loads, FMA-bound. Measured on the AVX-512 Xeon, 2 threads, K = 2 x 256, B = 32, the
// operands hot in cache (bench/NOTES.md, "Cells: one fused step"): 310-340 GFLOP/s for
// M = 256-1024, MKL 270-330 for the same sums; one thread 173 GFLOP/s (~90 % of a core's peak).
// With one vector across the batch (B <= 16) the broadcasts make it load-bound, and with three
// (B = 33-48) it lost to MKL in the cells, so it is built for two: kGemmBatch lanes.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace pyseqk {
namespace cpu {

using FVec = at::vec::Vectorized<float>;

// Vector registers of the build's ISA (AVX-512: 32, AVX2: 16).
constexpr int kVecRegs = FVec::size() == 16 ? 32 : 16;

// Vectors across the batch, and the batch rows they hold (32 on AVX-512): Xt and C have this
// many columns; those past the batch are padding, computed and never read (columns are
// independent).
constexpr int kGemmVecs = 2;
constexpr int64_t kGemmBatch = kGemmVecs * FVec::size();

// Whether the recurrent kernels use this GEMM (the fused cell step, the layers' fused forward,
// csrc/cpu/fused_layer.cpp): on AVX-512 builds, the only ISA it was measured on.
constexpr bool kGemmFused = FVec::size() == 16;

// Rows per register block for NV batch vectors: the accumulators, NV inputs and one broadcast
// fill the register file.
constexpr int gemm_block_rows(int nv) { return std::min(16, (kVecRegs - nv - 1) / nv); }

// A's stride along k: 1, known at compile time (weight rows, attention keys), or a run-time
// stride (attention values, read as A[e, j] = V[j, e]: lda = 1, ak = V's row stride).
struct UnitStride {
  constexpr operator int64_t() const { return 1; }
};

template <int R, int NV, class AK>
__attribute__((always_inline)) inline void gemm_block(const float* A, int64_t lda, AK ak,
                                                      const float* Xt, int64_t ldx, int64_t K,
                                                      float* C, int64_t ldc, bool accumulate) {
  constexpr int L = FVec::size();
  FVec c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? FVec::loadu(C + r * ldc + v * L) : FVec(0.f);
    }
  for (int64_t k = 0; k < K; ++k) {
    FVec x[NV];
    for (int v = 0; v < NV; ++v) x[v] = FVec::loadu(Xt + k * ldx + v * L);
    for (int r = 0; r < R; ++r) {
      const FVec a(A[r * lda + k * static_cast<int64_t>(ak)]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, x[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * L);
}

template <int NV, class AK, int... Rs>
inline void gemm_tail(int rows, const float* A, int64_t lda, AK ak, const float* Xt, int64_t ldx,
                      int64_t K, float* C, int64_t ldc, bool accumulate,
                      std::integer_sequence<int, Rs...>) {
  // rows < gemm_block_rows(NV): one block of exactly that many rows.
  ((rows == Rs + 1 ? gemm_block<Rs + 1, NV>(A, lda, ak, Xt, ldx, K, C, ldc, accumulate)
                   : void()),
   ...);
}

// C[m, :kGemmBatch] (+)= sum_k A[m * lda + k * ak] Xt[k, :kGemmBatch] for m < M, k < K; Xt and C
// have row strides ldx and ldc (at least kGemmBatch).
template <class AK = UnitStride>
inline void gemm_rows(const float* A, int64_t lda, const float* Xt, int64_t ldx, int64_t K,
                      float* C, int64_t ldc, int64_t M, bool accumulate, AK ak = {}) {
  constexpr int NV = kGemmVecs, R = gemm_block_rows(NV);
  int64_t m = 0;
  for (; m + R <= M; m += R) {
    gemm_block<R, NV>(A + m * lda, lda, ak, Xt, ldx, K, C + m * ldc, ldc, accumulate);
  }
  if (m < M) {
    gemm_tail<NV>(static_cast<int>(M - m), A + m * lda, lda, ak, Xt, ldx, K, C + m * ldc, ldc,
                  accumulate, std::make_integer_sequence<int, R - 1>{});
  }
}

// A's stride along k known at compile time: weights packed in panels (below), A[r + k * S].
template <int S>
struct FixedStride {
  constexpr operator int64_t() const { return S; }
};

// Weights packed in panels for gemm_panels (written by their user: csrc/cpu/fused_layer.cpp
// packs a thread's rows of two weight matrices into one): rows in blocks of kPanelRows (the last
// one shorter), each block stored k-major (block[k * rows + r]), the blocks one after the other,
// so that row m of an M x K matrix starts its block at m * K. The register block's R broadcasts
// per k then read consecutive floats, one stream, where rows as stored are R streams of their
// own whose offsets the compiler keeps in R general registers (14 did not fit: it spilled them
// to the stack inside the k loop).
constexpr int kPanelRows = gemm_block_rows(kGemmVecs);

template <int NV, int... Rs>
inline void gemm_panel_tail(int rows, const float* P, const float* Xt, int64_t ldx, int64_t K,
                            float* C, int64_t ldc, bool accumulate,
                            std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? gemm_block<Rs + 1, NV>(P, 1, FixedStride<Rs + 1>{}, Xt, ldx, K, C, ldc,
                                             accumulate)
                   : void()),
   ...);
}

// gemm_rows over panels: C[m, :kGemmBatch] (+)= sum_{k < kn} P(m, k0 + k) Xt[k, :] for m < M,
// P an M x K matrix in panels (Xt: the inputs of columns k0..k0+kn).
inline void gemm_panels(const float* P, int64_t M, int64_t K, int64_t k0, int64_t kn,
                        const float* Xt, int64_t ldx, float* C, int64_t ldc, bool accumulate) {
  constexpr int NV = kGemmVecs, R = kPanelRows;
  int64_t m = 0;
  for (; m + R <= M; m += R) {
    gemm_block<R, NV>(P + m * K + k0 * R, 1, FixedStride<R>{}, Xt, ldx, kn, C + m * ldc, ldc,
                      accumulate);
  }
  if (m < M) {
    const int rows = static_cast<int>(M - m);
    gemm_panel_tail<NV>(rows, P + m * K + k0 * rows, Xt, ldx, kn, C + m * ldc, ldc, accumulate,
                        std::make_integer_sequence<int, R - 1>{});
  }
}

}  // namespace cpu
}  // namespace pyseqk
