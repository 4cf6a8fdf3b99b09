// gemm.h's register-blocked GEMM on bf16 operands, for CPUs with AVX512_BF16 (VDPBF16PS: 16
// lanes x 2 products a lane per instruction, accumulated in fp32, twice the multiply-adds of an
// fp32 FMA per instruction: 117 against 57 G multiply-adds/s measured on one core of the AVX-512
// EPYC). Its user: the fused layer forward (csrc/cpu/fused_layer.cpp) of bfloat16 layers on a
// CPU without the AMX tile unit.
//
// Layouts: k in pairs (2p, 2p + 1), each pair one 32-bit word, the bf16 of k = 2p in its low half:
//   weights: gemm.h's panels with pairs in place of floats, block[p * rows + r];
//   inputs transposed: Xp[p * ldx + b], the pair of (X[2p, b], X[2p + 1, b]).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

#include "cpu/gemm.h"

namespace pyseqk {
namespace cpu {

// Whether this CPU has VDPBF16PS (CPUID leaf 7, subleaf 1, EAX bit 5) and the build the kernels
// below (AVX-512).
inline bool has_avx512_bf16() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool ok = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
  }();
  return ok;
#else
  return false;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
#define PYSEQK_BF16_TARGET __attribute__((target("avx512bf16")))

// fp32 to bf16, rounded to nearest even (NaN stays NaN).
inline uint32_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + (u >> 16 & 1u)) >> 16;
}

// The pair of row[k], row[k + 1] (0 past n).
inline uint32_t bf16_pair(const float* row, int64_t k, int64_t n) {
  return bf16_bits(row[k]) | (k + 1 < n ? bf16_bits(row[k + 1]) << 16 : 0u);
}

// Rows [K, ld] of fp32 (kGemmBatch lanes used) into pairs [(K + 1) / 2, ld], each rounded to
// bf16 (nearest even).
PYSEQK_BF16_TARGET inline void to_pairs(const float* src, int64_t K, int64_t ld, uint32_t* dst) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t p = 0; p < (K + 1) / 2; ++p) {
    for (int v = 0; v < kGemmVecs; ++v) {
      const __m512 lo = _mm512_loadu_ps(src + 2 * p * ld + v * 16);
      const __m512 hi = 2 * p + 1 < K ? _mm512_loadu_ps(src + (2 * p + 1) * ld + v * 16)
                                      : _mm512_setzero_ps();
      // cvtne2ps_pbh(hi, lo): lo's 16 bf16, then hi's; the permutation pairs them per lane.
      const __m512i pr = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_storeu_si512(dst + p * ld + v * 16, pr);
    }
  }
}

template <int R, int NV>
PYSEQK_BF16_TARGET __attribute__((always_inline)) inline void gemm_block_bf16(
    const uint32_t* P, const uint32_t* Xp, int64_t ldx, int64_t Kp, float* C, int64_t ldc,
    bool accumulate) {
  constexpr int L = 16;
  __m512 c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + v * L)
                                                      : _mm512_setzero_ps();
  for (int64_t p = 0; p < Kp; ++p) {
    __m512bh x[NV];
    for (int v = 0; v < NV; ++v) x[v] = (__m512bh)_mm512_loadu_si512(Xp + p * ldx + v * L);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(P[p * R + r]));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], x[v], a);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * L, c[r][v]);
}

template <int NV, int... Rs>
PYSEQK_BF16_TARGET inline void gemm_panel_tail_bf16(int rows, const uint32_t* P,
                                                    const uint32_t* Xp, int64_t ldx, int64_t Kp,
                                                    float* C, int64_t ldc, bool accumulate,
                                                    std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? gemm_block_bf16<Rs + 1, NV>(P, Xp, ldx, Kp, C, ldc, accumulate) : void()),
   ...);
}

// gemm_panels on pairs: C[m, :kGemmBatch] (+)= sum_{p < pn} P(m, p0 + p) . Xp[p, :] for m < M
// (the dot of two bf16 pairs, fp32 sums), P an M x Kp matrix of pairs in panels.
PYSEQK_BF16_TARGET inline void gemm_panels_bf16(const uint32_t* P, int64_t M, int64_t Kp,
                                                int64_t p0, int64_t pn, const uint32_t* Xp,
                                                int64_t ldx, float* C, int64_t ldc,
                                                bool accumulate) {
  constexpr int NV = kGemmVecs, R = kPanelRows;
  int64_t m = 0;
  for (; m + R <= M; m += R) {
    gemm_block_bf16<R, NV>(P + m * Kp + p0 * R, Xp, ldx, pn, C + m * ldc, ldc, accumulate);
  }
  if (m < M) {
    const int rows = static_cast<int>(M - m);
    gemm_panel_tail_bf16<NV>(rows, P + m * Kp + p0 * rows, Xp, ldx, pn, C + m * ldc, ldc,
                             accumulate, std::make_integer_sequence<int, R - 1>{});
  }
}
#endif

}  // namespace cpu
}  // namespace pyseqk
