// The whole-sequence layer ops: schemas (a fragment of the pyseqk library) and the CPU
// implementations, whose per-step GEMMs call the BLAS that ATen itself uses directly: on a
// single batch row (B = 1, H = 128) a step is a ~4 us GEMV and ATen's per-call overhead
// (dispatcher, output checks) would cost as much again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "cpu/blas.h"
#include "cpu/spin_barrier.h"
#include "ops/layers.h"
#include "pyseqk/cell_kernels.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace ops {
namespace {

// Below ~1M multiply-adds (B = 1, H = 128: 65k) a step's GEMM takes a few microseconds, about
// what waking the second OpenMP thread costs: run it on the calling thread.
constexpr int64_t kSingleThreadMacs = int64_t(1) << 20;
// Up to this many batch rows the recurrent GEMM is a hand-written GEMV (cpu::small_gemm_f32).
constexpr int64_t kSmallBatch = 2;
// The smallest step weight (elements) whose GEMV the time loop splits between threads.
constexpr int64_t kTeamMinWeight = int64_t(1) << 15;

struct SingleThreadIfSmall {
  int previous = -1;
  explicit SingleThreadIfSmall(int64_t macs) {
    if (macs < kSingleThreadMacs && MKL_Set_Num_Threads_Local) {
      previous = MKL_Set_Num_Threads_Local(1);
    }
  }
  ~SingleThreadIfSmall() {
    if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
  }
};

using cpu::SpinBarrier;

struct CpuLayerKernels {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  // Row-major C = op(A) op(B) + beta C: the tiny-batch GEMV, the BLAS (cpu/blas.h) or ATen.
  static void gemm(const at::Tensor& like, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                   const void* A, int64_t lda, const void* B, int64_t ldb, double beta, void* C,
                   int64_t ldc) {
    if (M == 0 || N == 0) return;
    const bool fits = K > 0 && cpu::blas_fits({M, N, K, lda, ldb, ldc});
    const auto st = like.scalar_type();
    if (st == at::kFloat && M <= kSmallBatch && !ta && K > 0) {
      cpu::small_gemm_f32(tb, M, N, K, static_cast<const float*>(A), lda,
                          static_cast<const float*>(B), ldb, static_cast<float>(beta),
                          static_cast<float*>(C), ldc);
      return;
    }
    const SingleThreadIfSmall threads(M * N * K);
    if (fits && st == at::kFloat && sgemm_) {
      cpu::blas_mm<float>(ta, tb, M, N, K, 1.f, static_cast<const float*>(A), lda,
                          static_cast<const float*>(B), ldb, static_cast<float>(beta),
                          static_cast<float*>(C), ldc);
      return;
    }
    if (fits && st == at::kDouble && dgemm_) {
      cpu::blas_mm<double>(ta, tb, M, N, K, 1.0, static_cast<const double*>(A), lda,
                           static_cast<const double*>(B), ldb, beta, static_cast<double*>(C), ldc);
      return;
    }
    aten_gemm(like.options(), ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }

  // A step weight w [K, N]; fp32 weights of GEMMs above kSmallBatch rows are also packed for MKL
  // (column-major: w is the left operand, "A", of C^T = w^T-as-stored x A^T), on the first step
  // GEMM that uses them: smaller batches never use a packed copy (their steps are
  // cpu::small_gemm_f32), so none is made for them.
  struct Weight {
    at::Tensor w;
    mutable at::Tensor packed;
    mutable bool pack_tried = false;
    int k = 0, n = 0;
    Weight(const at::Tensor& w_, int64_t rows) : w(w_) {
      if (rows <= kSmallBatch || !w.defined() || w.scalar_type() != at::kFloat ||
          !sgemm_pack_ || !sgemm_compute_ || !sgemm_pack_get_size_ || w.numel() == 0 ||
          w.size(0) >= INT_MAX || w.size(1) >= INT_MAX) {
        pack_tried = true;
        return;
      }
      k = static_cast<int>(w.size(0));
      n = static_cast<int>(w.size(1));
    }
    const at::Tensor& packed_once() const {
      if (!pack_tried) {
        pack_tried = true;
        const int one_row = 1;
        const size_t bytes = sgemm_pack_get_size_("A", &n, &one_row, &k);
        packed = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, w.options());
        const float alpha = 1.f;
        sgemm_pack_("A", "N", &n, &one_row, &k, &alpha, w.data_ptr<float>(), &n,
                    packed.data_ptr<float>());
      }
      return packed;
    }
  };

  // fp32 through 16 x 16 register tiles: ATen's copy of the transposed view took 37 us of a
  // T = 1, B = 1, H = 128 LSTM call's 80 (512 x 128 W_hh); the tiles take a few.
  static at::Tensor transposed(const at::Tensor& w) {
    if (w.scalar_type() != at::kFloat || !w.is_contiguous()) return w.t().contiguous();
    at::Tensor out = at::empty({w.size(1), w.size(0)}, w.options());
    cpu::transpose_f32(w.data_ptr<float>(), w.size(1), out.data_ptr<float>(), w.size(0),
                       w.size(0), w.size(1));
    return out;
  }

  static void step_gemm(const Weight& w, int64_t M, const void* A, int64_t lda, double beta,
                        void* C, int64_t ldc) {
    const int64_t N = w.w.size(1), K = w.w.size(0);
    if (M > kSmallBatch && M < INT_MAX && lda < INT_MAX && ldc < INT_MAX &&
        w.packed_once().defined()) {
      const int m = static_cast<int>(M), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
      const float b = static_cast<float>(beta);
      const SingleThreadIfSmall threads(M * N * K);
      sgemm_compute_("P", "N", &w.n, &m, &w.k, w.packed.data_ptr<float>(), &w.n,
                     static_cast<const float*>(A), &la, &b, static_cast<float*>(C), &lc);
      return;
    }
    gemm(w.w, false, false, M, N, K, A, lda, w.w.data_ptr(), N, beta, C, ldc);
  }

  // The forward time loops. At one or two batch rows (fp32) a step is a GEMV over W_hh, a few
  // microseconds, and forking threads for it costs as much: there one OpenMP team runs the whole
  // loop. Each thread owns a range of hidden units: every step it multiplies the columns of W_hh
  // of its units' G gates (so that slice stays in its core's L2), runs the gate kernel on its
  // units, and meets the others at one barrier (h_t complete). With a projection (G = 0) the
  // gate kernel needs the whole GEMM: column slices, a barrier, the kernel on thread 0, a barrier.
  // Measured at T=200 B=1 H=128, 2 threads (bench/NOTES.md): LSTM 0.85 -> 0.69 ms, GRU 0.69 ->
  // 0.55; the RNN's 128 x 128 GEMV (16k multiply-adds) got slower, so weights smaller than
  // kTeamMinWeight keep the serial loop. Above two rows the team was tried with MKL's packed
  // GEMM on per-thread slices and gained nothing. (On AVX-512 builds fp32 layers without
  // projection at B <= 2 run csrc/cpu/fused_small.cpp instead: fused_forward in layers.h.)
  template <class GemmOf, class Point>
  static void time_loop(const Weight& w, int64_t T, int64_t B, int64_t H, int G,
                        const GemmOf& gemm_of, const Point& point) {
    const int threads = at::get_num_threads();
    if (threads < 2 || B > kSmallBatch || !w.w.defined() || w.w.scalar_type() != at::kFloat ||
        at::in_parallel_region() || w.w.numel() < kTeamMinWeight) {
      serial_time_loop(&step_gemm, w, T, H, gemm_of, point);
      return;
    }
    const int64_t K = w.w.size(0), N = w.w.size(1);
    const int64_t span = G > 0 ? H : N;  // what the threads split: units, or columns
    const int64_t chunk0 = ((span + threads - 1) / threads + 15) / 16 * 16;
    const int team = static_cast<int>((span + chunk0 - 1) / chunk0);
    const float* wp = w.w.data_ptr<float>();
    SpinBarrier barrier;
#pragma omp parallel num_threads(team)
    {
      // OpenMP may start fewer threads than asked for: split by the team that really runs.
      const int nt = omp_get_num_threads();
      const int64_t chunk = ((span + nt - 1) / nt + 15) / 16 * 16;
      const int64_t c0 = std::min(span, omp_get_thread_num() * chunk);
      const int64_t c1 = std::min(c0 + chunk, span);
      for (int64_t s = 0; s < T; ++s) {
        const StepGemm g = gemm_of(s);
        const auto* a = static_cast<const float*>(g.A);
        auto* c = static_cast<float*>(g.C);
        const float beta = static_cast<float>(g.beta);
        if (G > 0) {
          if (c1 > c0) {
            cpu::small_gemm_gates_f32(G, g.m, c1 - c0, K, a, g.lda, wp + c0, N, H, beta, c + c0,
                                      g.ldc);
            point(s, c0, c1);
          }
        } else {
          if (g.m > 0 && c1 > c0) {
            cpu::small_gemm_f32(false, g.m, c1 - c0, K, a, g.lda, wp + c0, N, beta, c + c0,
                                g.ldc);
          }
          barrier.wait(nt);
          if (c0 == 0) point(s, int64_t(0), H);
        }
        barrier.wait(nt);
      }
    }
  }

  // The whole-layer forward with the input projection inside the loop (fused_forward, layers.h).
  static constexpr bool kFusedLayer = true;
  static constexpr auto fused_forward = &cpu::fused_layer_forward;

  static constexpr auto lstm_forward_units = &cpu::lstm_layer_forward_units;
  static constexpr auto gru_forward_units = &cpu::gru_layer_forward_units;
  static constexpr auto rnn_forward_units = &cpu::rnn_layer_forward_units;
  static constexpr auto lstm_backward_step = &cpu::lstm_layer_backward_step;
  static constexpr auto select_step = &cpu::layer_select_step;
  static constexpr auto grad_step = &cpu::layer_grad_step;
  static constexpr auto gru_backward_step = &cpu::gru_layer_backward_step;
  static constexpr auto rnn_backward_step = &cpu::rnn_layer_backward_step;
};

}  // namespace

// Workspaces are outputs so that autograd can save them: gates [T, B, 4H] activated (LSTM) or
// r, z, n, hn (GRU); hs [T+1, B, P] and cs [T+1, B, H] every state in time order (see layers.h);
// ms [T, B, H] the pre-projection o*tanh(c) (LSTM with w_hr; else empty). workspace=False (no
// gradient wanted, as torch.nn's inference path): they come back with no time steps, and the
// CPU's fused forward does not write them.
TORCH_LIBRARY_FRAGMENT(pyseqk, m) {
  m.def(
      "lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool workspace=True) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor hs, Tensor cs, Tensor ms)");
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "Tensor gates, Tensor hs, Tensor cs, Tensor ms) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  m.def(
      "gru_layer(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? lengths, bool reverse, bool workspace=True) -> (Tensor output, Tensor h_n, "
      "Tensor gates, Tensor hs)");
  m.def(
      "gru_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor w_ih, "
      "Tensor w_hh, Tensor? lengths, bool reverse, Tensor gates, Tensor hs) -> (Tensor "
      "grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  m.def(
      "rnn_layer(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool relu, Tensor? lengths, bool reverse, bool workspace=True) -> (Tensor output, "
      "Tensor h_n, Tensor hs)");
  m.def(
      "rnn_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor input, Tensor w_ih, "
      "Tensor w_hh, bool relu, Tensor? lengths, bool reverse, Tensor hs) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) { Layers<CpuLayerKernels>::register_impls(m); }

}  // namespace ops
}  // namespace pyseqk
