// The Fortran BLAS of the library torch links (MKL in the x86 wheels), called directly by the CPU
// kernels (SDPA's tiles, the cells' gate sums, the layers' step GEMMs): the typed
// at::native::cpublas::gemm overloads are not exported to extensions, and at::mm costs a
// dispatcher round and output checks per call, paid thousands of times per op here. Declared
// weak, so that a torch built without BLAS still loads this library (callers test the symbol, or
// blas_mm runs a plain loop).
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's C API (mkl_set_num_threads_local is a macro for it; the lowercase symbol is the
// Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
// MKL's packed GEMM (Fortran names): an operand packed once, reused by many GEMMs.
size_t sgemm_pack_get_size_(const char* identifier, const int* m, const int* n, const int* k)
    __attribute__((weak));
void sgemm_pack_(const char* identifier, const char* trans, const int* m, const int* n,
                 const int* k, const float* alpha, const float* src, const int* ld, float* dest)
    __attribute__((weak));
void sgemm_compute_(const char* transa, const char* transb, const int* m, const int* n,
                    const int* k, const float* a, const int* lda, const float* b, const int* ldb,
                    const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace pyseqk {
namespace cpu {

// Row-major C[M x N] = alpha * op(A) op(B) + beta * C, through the column-major BLAS: a row-major
// matrix is the column-major transpose, so C^T = op(B)^T op(A)^T with the operands swapped.
// Leading dimensions are row strides; every size and leading dimension must fit an int
// (blas_fits).
template <class T>
inline void blas_mm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* Bm, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&ta, &tb, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_) return dgemm_(&ta, &tb, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
  }
  // No BLAS in this torch: a plain loop (correct, slow; x86 and arm wheels all ship a BLAS).
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc = T(0);
      for (int64_t p = 0; p < K; ++p) {
        acc += (trans_a ? A[p * lda + i] : A[i * lda + p]) *
               (trans_b ? Bm[j * ldb + p] : Bm[p * ldb + j]);
      }
      C[i * ldc + j] = alpha * acc + (beta == T(0) ? T(0) : beta * C[i * ldc + j]);
    }
  }
}

inline bool blas_fits(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v < 0 || v >= INT_MAX) return false;
  }
  return true;
}

}  // namespace cpu
}  // namespace pyseqk
