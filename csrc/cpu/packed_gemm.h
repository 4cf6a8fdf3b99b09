// The gate GEMM of the recurrent cells on the CPU, with the weights packed once and reused every
// step: out [M, N] = a1 [M, K1] w1[N, K1]^T + a2 [M, K2] w2[N, K2]^T (fp32).
//
// Why not ATen's GEMM: a time loop calls the same weights every step. A generic GEMM re-reads
// them in row-major order and splits the work between the cores differently from call to call;
// here the weights of both matrices are packed side by side into column panels of kNR outputs
// (panel p, step k: kNR consecutive floats), each core always takes the same panels, so its half
// of the weights stays in its own L2 from one step to the next, and the x and h halves of the
// gate sum need neither a concatenation nor a second GEMM call.
#pragma once

#include <cstdint>

namespace pyseqk {
namespace cpu {

// Outputs per panel: two AVX2 vectors (or two AVX-512 vectors in an AVX-512 build).
int64_t packed_gemm_panel_width();

// Floats needed to pack [w1 | w2] with N rows and K1 + K2 columns.
int64_t packed_gemm_size(int64_t N, int64_t K1, int64_t K2);

// w1 [N, K1], w2 [N, K2] (w2 may be null with K2 = 0), both contiguous, into `packed`.
void packed_gemm_pack(const float* w1, int64_t K1, const float* w2, int64_t K2, int64_t N,
                      float* packed);

// out[m, n] (row stride ldo) = sum_k a1[m, k] w1[n, k] + sum_k a2[m, k] w2[n, k], a1 [M, K1] and
// a2 [M, K2] contiguous (a2 null when K2 = 0), with `packed` from packed_gemm_pack.
void packed_gemm(const float* a1, const float* a2, int64_t M, const float* packed, int64_t N,
                 int64_t K1, int64_t K2, float* out, int64_t ldo);

}  // namespace cpu
}  // namespace pyseqk
