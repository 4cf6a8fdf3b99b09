// See packed_gemm.h. The microkernel keeps kMR x kNR outputs in registers (6 x 16 on AVX2:
// 12 accumulators, 2 weight vectors and 1 broadcast = 15 of the 16 ymm registers) and streams
// one packed panel, so each weight load feeds kMR fused multiply-adds.
#include "cpu/packed_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>

namespace pyseqk {
namespace cpu {
namespace {

using V = at::vec::Vectorized<float>;
constexpr int64_t kL = V::size();
constexpr int64_t kNR = 2 * kL;
constexpr int kMR = 6;

// Steps of k summed in registers before they are added to the output. One chain of 512
// fused multiply-adds per output gave twice the rounding error of ATen's blocked GEMM; partial
// sums of kKC steps bring it level, for one extra load and store of the tile per block.
constexpr int64_t kKC = 128;

// out[m, 0:ncols] (+)= sum over k in [0, K) of a[m * lda + k] * panel[k * kNR + 0:ncols].
template <int MR>
void micro(const float* a, int64_t lda, int64_t K, const float* panel, float* out, int64_t ldo,
           int64_t ncols, bool add) {
  V acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = V(0.0f);
  const float* b = panel;
  for (int64_t k = 0; k < K; ++k, b += kNR) {
    const V b0 = V::loadu(b);
    const V b1 = V::loadu(b + kL);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const V av(a[m * lda + k]);
      acc0[m] = at::vec::fmadd(av, b0, acc0[m]);
      acc1[m] = at::vec::fmadd(av, b1, acc1[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* o = out + m * ldo;
    if (ncols == kNR) {
      if (add) {
        acc0[m] = acc0[m] + V::loadu(o);
        acc1[m] = acc1[m] + V::loadu(o + kL);
      }
      acc0[m].store(o);
      acc1[m].store(o + kL);
    } else {
      float tmp[kNR];
      acc0[m].store(tmp);
      acc1[m].store(tmp + kL);
      for (int64_t j = 0; j < ncols; ++j) o[j] = add ? o[j] + tmp[j] : tmp[j];
    }
  }
}

// Rows [m0, m0 + MR) of one panel: both operands, kKC steps at a time.
template <int MR>
void panel_rows(const float* a1, int64_t K1, const float* a2, int64_t K2, int64_t m0,
                const float* panel, float* out, int64_t ldo, int64_t ncols) {
  out += m0 * ldo;
  bool add = false;
  for (int seg = 0; seg < 2; ++seg) {
    const float* a = seg == 0 ? a1 + m0 * K1 : a2 + m0 * K2;
    const int64_t K = seg == 0 ? K1 : K2;
    const int64_t lda = K;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      micro<MR>(a + k0, lda, std::min(kKC, K - k0), panel + k0 * kNR, out, ldo, ncols, add);
      add = true;
    }
    panel += K1 * kNR;  // the second operand's steps follow the first's
  }
  if (!add) {  // K1 = K2 = 0: the sum is empty
    for (int m = 0; m < MR; ++m) std::memset(out + m * ldo, 0, sizeof(float) * ncols);
  }
}

}  // namespace

int64_t packed_gemm_panel_width() { return kNR; }

int64_t packed_gemm_size(int64_t N, int64_t K1, int64_t K2) {
  return (N + kNR - 1) / kNR * kNR * (K1 + K2);
}

void packed_gemm_pack(const float* w1, int64_t K1, const float* w2, int64_t K2, int64_t N,
                      float* packed) {
  const int64_t K = K1 + K2, panels = (N + kNR - 1) / kNR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = packed + p * K * kNR;
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t n = p * kNR + j;
        for (int64_t k = 0; k < K; ++k) {
          float v = 0.0f;  // columns past N are zero, so the last panel needs no special case
          if (n < N) v = k < K1 ? w1[n * K1 + k] : w2[n * K2 + (k - K1)];
          dst[k * kNR + j] = v;
        }
      }
    }
  });
}

void packed_gemm(const float* a1, const float* a2, int64_t M, const float* packed, int64_t N,
                 int64_t K1, int64_t K2, float* out, int64_t ldo) {
  const int64_t K = K1 + K2, panels = (N + kNR - 1) / kNR;
  // At least ~64k multiply-adds per task, so that small cells stay on one thread. The split by
  // panel is static, so each core reads the same weights every step (they stay in its L2).
  const int64_t per_panel = std::max<int64_t>(1, M * K * kNR);
  const int64_t grain = std::max<int64_t>(1, 65536 / per_panel);
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = packed + p * K * kNR;
      float* o = out + p * kNR;
      const int64_t ncols = std::min(kNR, N - p * kNR);
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR) panel_rows<kMR>(a1, K1, a2, K2, m, panel, o, ldo, ncols);
      switch (M - m) {
        case 5: panel_rows<5>(a1, K1, a2, K2, m, panel, o, ldo, ncols); break;
        case 4: panel_rows<4>(a1, K1, a2, K2, m, panel, o, ldo, ncols); break;
        case 3: panel_rows<3>(a1, K1, a2, K2, m, panel, o, ldo, ncols); break;
        case 2: panel_rows<2>(a1, K1, a2, K2, m, panel, o, ldo, ncols); break;
        case 1: panel_rows<1>(a1, K1, a2, K2, m, panel, o, ldo, ncols); break;
        default: break;
      }
    }
  });
}

}  // namespace cpu
}  // namespace pyseqk
