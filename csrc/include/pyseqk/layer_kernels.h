// Launcher declarations of the per-step kernels of the whole-sequence layers (lstm_layer,
// gru_layer, rnn_layer): the CPU versions (csrc/cpu/layers.cpp) and the CUDA versions
// (csrc/cuda/layers.cu) take the same arguments. Torch-free.
//
// The time loop lives in csrc/ops/layers.h; per step it runs one GEMM (h_{t-1} W_hh^T, or
// dgates W_hh backward) and one of these kernels over the whole batch. Every pointer is a
// contiguous row-major block of the kernel's dtype for time step t; B = batch, H = hidden size,
// P = projected size (H without projection).
//
// lengths: int64 [B] on the kernel's device, or nullptr (every row valid). Row b is valid at
// step t when t < lengths[b]; an invalid row carries its state unchanged (new = prev), its output
// is zero and its gate gradients are zero (so that the weight-gradient GEMMs over all steps may
// include it), and the gradient flowing back through it is passed on unchanged.
#pragma once

#include <cstdint>

#include "pyseqk/dtype.h"

typedef struct CUstream_st* cudaStream_t;

namespace pyseqk {

#define PYSEQK_LAYER_KERNELS(STREAM_ARG)                                                          \
  /* gates  [B, 4H] in: x W_ih^T + b_ih + b_hh + h W_hh^T; out: activated i, f, g, o           */ \
  /* c_prev, c_new [B, H]                                                                      */ \
  /* h_prev [B, H] or nullptr: with it, h_new = o tanh(c) (invalid rows: h_prev); without it  */  \
  /*        (projection) h_new receives m = o tanh(c) (invalid rows: 0)                        */ \
  /* out    [B, H] or nullptr: h_new on valid rows, 0 on invalid ones                          */ \
  void lstm_layer_forward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,        \
                               int64_t H, void* gates, const void* c_prev, void* c_new,          \
                               const void* h_prev, void* h_new, void* out STREAM_ARG);           \
  /* gates [B, 4H] activated; c_prev, c_new [B, H]; dh [B, H] gradient of h (or of m)          */ \
  /* grad_out [B, H] or nullptr: added to dh; dc [B, H] in: grad of c_new, out: of c_prev     */  \
  /* dgates [B, 4H] out; dh_next [B, H] or nullptr: 0 on valid rows, dh on invalid rows        */ \
  void lstm_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,       \
                                int64_t H, const void* gates, const void* c_prev,                \
                                const void* c_new, const void* dh, const void* grad_out,         \
                                void* dc, void* dgates, void* dh_next STREAM_ARG);               \
  /* After a projection written into out [B, P]: h_new = out on valid rows; h_new = h_prev and */ \
  /* out = 0 on invalid rows.                                                                  */ \
  void layer_select_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,   \
                         void* out, const void* h_prev, void* h_new STREAM_ARG);                 \
  /* dr = dh + grad_out (grad_out may be nullptr), dh_next = 0 on valid rows;                  */ \
  /* dr = 0, dh_next = dh on invalid rows. All [B, P].                                         */ \
  void layer_grad_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B, int64_t P,     \
                       const void* dh, const void* grad_out, void* dr, void* dh_next STREAM_ARG); \
  /* gi [B, 3H]: x W_ih^T + b_ih + (b_hr, b_hz, 0); gh [B, 3H]: h W_hh^T; b_hn [H] or nullptr  */ \
  /* ws [B, 4H] out: r, z, n, hn (hn = h W_hn^T + b_hn); h_prev, h_new, out [B, H]             */ \
  void gru_layer_forward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,         \
                              int64_t H, const void* gi, const void* gh, const void* b_hn,       \
                              const void* h_prev, void* ws, void* h_new, void* out STREAM_ARG);  \
  /* ws [B, 4H]; h_prev, dh [B, H]; grad_out [B, H] or nullptr                                 */ \
  /* dgi, dgh [B, 3H] out; dh_next [B, H] out: the part of dh_prev bypassing W_hh              */ \
  void gru_layer_backward_step(DType dtype, int64_t t, const int64_t* lengths, int64_t B,        \
                               int64_t H, const void* ws, const void* h_prev, const void* dh,    \
                               const void* grad_out, void* dgi, void* dgh,                       \
                               void* dh_next STREAM_ARG);                                        \
  /* pre [B, H]: x W_ih^T + b_ih + b_hh + h W_hh^T; h_prev, h_new, out [B, H]                  */ \
  void rnn_layer_forward_step(DType dtype, bool relu, int64_t t, const int64_t* lengths,         \
                              int64_t B, int64_t H, const void* pre, const void* h_prev,         \
                              void* h_new, void* out STREAM_ARG);                                \
  /* h_new, dh [B, H]; grad_out [B, H] or nullptr; dpre [B, H] out; dh_next [B, H] out         */ \
  void rnn_layer_backward_step(DType dtype, bool relu, int64_t t, const int64_t* lengths,        \
                               int64_t B, int64_t H, const void* h_new, const void* dh,          \
                               const void* grad_out, void* dpre, void* dh_next STREAM_ARG);

namespace cpu {
PYSEQK_LAYER_KERNELS()
// The CPU's forward step kernels take the hidden units [u0, u1) of every row to work on, u0 a
// multiple of 16 (the layers' thread team gives each thread the units of its slice of W_hh;
// (0, H) is the whole step). They stand for the three *_forward_step above, which the CPU does
// not define.
void lstm_layer_forward_units(int64_t u0, int64_t u1, DType dtype, int64_t t,
                              const int64_t* lengths, int64_t B, int64_t H, void* gates,
                              const void* c_prev, void* c_new, const void* h_prev, void* h_new,
                              void* out);
void gru_layer_forward_units(int64_t u0, int64_t u1, DType dtype, int64_t t,
                             const int64_t* lengths, int64_t B, int64_t H, const void* gi,
                             const void* gh, const void* b_hn, const void* h_prev, void* ws,
                             void* h_new, void* out);
void rnn_layer_forward_units(int64_t u0, int64_t u1, DType dtype, bool relu, int64_t t,
                             const int64_t* lengths, int64_t B, int64_t H, const void* pre,
                             const void* h_prev, void* h_new, void* out);
// Row-major C[M, N] = A[M, K] op(B) + beta C for a tiny M (fp32, one thread): op(B) = B^T with
// B [N, K] when tb, else B [K, N].
void small_gemm_f32(bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The same GEMM (op(B) = B) on G column blocks at once: columns [q * gate_stride, + N) of B and C
// for q < G (the gates of a range of hidden units), every a[k] broadcast once for all of them
// and G x (up to 4) accumulators in flight, where one block at a time had 4 dependent chains.
void small_gemm_gates_f32(int G, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* B, int64_t ldb, int64_t gate_stride, float beta, float* C,
                          int64_t ldc);

// One fp32 layer's whole forward (no LSTM projection) in one thread team, the input projection
// inside the time loop (csrc/cpu/fused_layer.cpp; on the AMX tile unit where the CPU has it,
// csrc/cpu/fused_layer_tiles.cpp): the CPU's path for batches of kFusedMinBatch..32 rows
// (kTilesMinBatch..32 with the tile unit), and of 1..kFusedSmallBatch rows (csrc/cpu/
// fused_small.cpp) on AVX-512 builds. Pointers are contiguous row-major fp32.
struct FusedLayer {
  enum Kind { kLstm, kGru, kRnnTanh, kRnnRelu };
  Kind kind = kLstm;
  int64_t T = 0, B = 0, I = 0, H = 0;
  bool reverse = false;
  const float* x = nullptr;                          // [T, B, I]
  const float* h0 = nullptr;                         // [B, H]
  const float* c0 = nullptr;                         // [B, H] (LSTM)
  const float* w_ih = nullptr;                       // [G * H, I], as stored in the module
  const float* w_hh = nullptr;                       // [G * H, H]
  const float* b_ih = nullptr;                       // [G * H] or nullptr
  const float* b_hh = nullptr;                       // [G * H] or nullptr
  const int64_t* lengths = nullptr;                  // [B] (host) or nullptr
  float* out = nullptr;                              // [T, B, H]
  float* h_n = nullptr;                              // [B, H]
  float* c_n = nullptr;                              // [B, H] (LSTM)
  // The workspace (or nullptr: not written). hs, cs: every state, slots as in ops/layers.h (the
  // caller fills the initial one); ws: LSTM i, f, g, o activated, GRU r, z, n, hn.
  float* hs = nullptr;                               // [T + 1, B, H]
  float* cs = nullptr;                               // [T + 1, B, H] (LSTM)
  float* ws = nullptr;                               // [T, B, 4H] (LSTM, GRU)
  // A bfloat16 layer: x, h0, c0, the weights and biases are fp32 copies of bf16 tensors, and the
  // GEMMs take bf16 products, h rounded to bf16 as the next step's operand; the states and the
  // gate math stay fp32 (on the AMX tile unit, or on bf16 pairs with AVX512_BF16:
  // fused_layer_fits).
  bool bf16_products = false;
};
// The smallest batch it takes: below, the 32-lane register block computes mostly padding (B = 20,
// T = 50, H = 256: the LSTM 5.8 ms against 5.4 in the loop of csrc/ops/layers.cpp; B = 8: 6.0
// against 2.3).
constexpr int64_t kFusedMinBatch = 24;
// The same on a CPU with the AMX tile unit (csrc/cpu/fused_layer_tiles.cpp; 16-row tiles): at
// T = 100, H = 256, against that loop, B = 12: LSTM 4.09 ms against 5.01, GRU 2.61 / 3.71, RNN
// 1.18 / 1.58; B = 8: LSTM 3.89 against 3.39 (its 1.5 MB of weight pieces per thread stream
// each step), RNN equal.
constexpr int64_t kTilesMinBatch = 12;
// At most this many rows (fp32): csrc/cpu/fused_small.cpp, GEMVs in one team with the input
// projection computed by each thread for its own units while the others finish a step.
constexpr int64_t kFusedSmallBatch = 2;
// Whether fused_layer_forward takes a batch of B rows here (an AVX-512 build, not inside a
// parallel region; bf16: a bfloat16 layer, on the tile unit or with AVX512_BF16); the caller's
// other conditions are the caller's to check.
bool fused_layer_fits(int64_t B, bool bf16);
// T >= 1, B >= 1.
void fused_layer_forward(const FusedLayer& f);
}  // namespace cpu

namespace cuda {
#define PYSEQK_LAYER_STREAM_ARG , cudaStream_t stream
PYSEQK_LAYER_KERNELS(PYSEQK_LAYER_STREAM_ARG)
#undef PYSEQK_LAYER_STREAM_ARG
}  // namespace cuda

}  // namespace pyseqk
