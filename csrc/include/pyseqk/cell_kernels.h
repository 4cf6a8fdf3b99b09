// Launcher declarations of the fused cell kernels: the CPU versions (csrc/cpu/cells.cpp) and the
// CUDA versions (csrc/cuda/cells.cu) take the same arguments. Torch-free.
//
// All tensors are contiguous, row-major, of the kernel's dtype; B = batch, H = hidden size.
// Biases are optional (nullptr = no bias). The GEMMs that produce the gate sums run before the
// kernel (ATen/cuBLAS); the kernel fuses bias, activations, state update and saving for backward.
#pragma once

#include <cstdint>

#include "pyseqk/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyseqk {

// STAGED_ARG: the CPU forward kernels take one more argument (cpu::StepSums below).
#define PYSEQK_CELL_KERNELS(STREAM_ARG, STAGED_ARG)                                              \
  /* ws     [B, 4H] in: x W_ih^T + h W_hh^T (no bias); out: activated gates i, f, g, o        */ \
  /* b_ih, b_hh [4H] or nullptr; cx [B, H]; hy, cy [B, H] out                                 */ \
  void lstm_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh,              \
                         const void* cx, void* hy, void* cy, int64_t B,                          \
                         int64_t H STAGED_ARG STREAM_ARG);                                       \
  /* ws [B, 4H] activated gates; cx, cy [B, H]; dhy, dcy [B, H] or nullptr (zero)             */ \
  /* dgates [B, 4H] out: gradient of the pre-activation gate sums; dcx [B, H] out            */  \
  void lstm_cell_backward(DType dtype, const void* ws, const void* cx, const void* cy,           \
                          const void* dhy, const void* dcy, void* dgates, void* dcx, int64_t B,  \
                          int64_t H STREAM_ARG);                                                 \
  /* ws [B, 6H] in: [:, :3H] = x W_ih^T, [:, 3H:] = h W_hh^T (no bias);                       */ \
  /*            out: [:, :4H] = r, z, n, hn (hn = h W_hn^T + b_hn), [:, 4H:] unspecified      */ \
  /* b_ih, b_hh [3H] or nullptr; hx, hy [B, H]                                                */ \
  void gru_cell_forward(DType dtype, void* ws, const void* b_ih, const void* b_hh,               \
                        const void* hx, void* hy, int64_t B, int64_t H STAGED_ARG STREAM_ARG);   \
  /* ws [B, 6H] from forward; hx [B, H]; dhy [B, H]                                           */ \
  /* dgi, dgh [B, 3H] out: gradients of the input and hidden gate sums; dh_direct [B, H] out */  \
  void gru_cell_backward(DType dtype, const void* ws, const void* hx, const void* dhy,           \
                         void* dgi, void* dgh, void* dh_direct, int64_t B,                       \
                         int64_t H STREAM_ARG);                                                  \
  /* hy [B, H] in: x W_ih^T + h W_hh^T (no bias); out: act(sum + b_ih + b_hh)                 */ \
  void rnn_cell_forward(DType dtype, bool relu, void* hy, const void* b_ih, const void* b_hh,    \
                        int64_t B, int64_t H STAGED_ARG STREAM_ARG);                             \
  /* hy, dhy [B, H]; dpre [B, H] out: gradient of the pre-activation sum                      */ \
  void rnn_cell_backward(DType dtype, bool relu, const void* hy, const void* dhy, void* dpre,     \
                         int64_t B, int64_t H STREAM_ARG);

namespace cpu {
// The gate sums of a float32 forward step, handed to the CPU forward kernels instead of ws
// holding them, so that the kernel computes them, or moves them into ws, inside its own parallel
// loop: each thread the rows of the hidden units it owns, then the gate math of those units while
// their sums sit in L1 (no separate GEMM call, transpose pass or fork).
// The sums are transposed: sums [rows, ld], rows = ws's columns (4H LSTM, 6H GRU, H RNN), ld >= B.
struct StepSums {
  float* sums = nullptr;
  int64_t ld = 0;
  // true: sums holds them already (a BLAS GEMM). false: the kernel computes them with
  // cpu::gemm_rows (ld = cpu::kGemmBatch): sums = w_ih x^T + w_hh h^T, or stacked (GRU)
  // [w_ih x^T ; w_hh h^T], from x [B, I] and h [B, H] (contiguous), each thread first
  // transposing x and h into a buffer of its own.
  bool ready = true;
  const float* x = nullptr;
  const float* h = nullptr;
  const float* w_ih = nullptr;
  const float* w_hh = nullptr;
  int64_t B = 0, I = 0;
};
// sums: nullptr (ws, or hy for the RNN cell, holds the gate sums as documented above) or the
// sums as a StepSums (float32 only).
#define PYSEQK_STAGED_ARG , const StepSums* sums
PYSEQK_CELL_KERNELS(, PYSEQK_STAGED_ARG)
#undef PYSEQK_STAGED_ARG

// Batches of at most this many rows get their gate sums from small_batch_gates.
constexpr int64_t kMaxSmallBatch = 4;
// out [B, N] (row stride ldo) = x [B, I] w_ih[N, I]^T + h [B, H] w_hh[N, H]^T (H may be 0), for
// float32 and 1 <= B <= kMaxSmallBatch, all contiguous; returns false (does nothing) otherwise.
bool small_batch_gates(DType dtype, const void* x, const void* w_ih, int64_t I, const void* h,
                       const void* w_hh, int64_t H, void* out, int64_t ldo, int64_t B, int64_t N);
// dst[c, r] (+)= src[r, c] for src [rows, cols] (row stride ld_src), dst [cols, rows] (ld_dst).
void transpose_f32(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
                   int64_t cols, bool accumulate = false);
}  // namespace cpu

namespace cuda {
#define PYSEQK_STREAM_ARG , cudaStream_t stream
PYSEQK_CELL_KERNELS(PYSEQK_STREAM_ARG, )
#undef PYSEQK_STREAM_ARG
}  // namespace cuda

}  // namespace pyseqk
