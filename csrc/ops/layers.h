// at::Tensor entry points of the whole-sequence layer ops (lstm_layer, gru_layer, rnn_layer and
// their backward ops), written once for every device: `K` supplies the per-step kernels
// (csrc/cpu/layers.cpp or csrc/cuda/layers.cu) and a row-major GEMM on raw pointers.
//
// Shape of the work: the input projection of all T steps is one GEMM with the biases folded in;
// then a time loop, each step one GEMM h_{t-1} W_hh^T accumulated onto that step's projection,
// and one fused kernel over the batch. Nothing is allocated inside the loop. (The CPU's fp32
// forward at 24-32 batch rows instead runs csrc/cpu/fused_layer.cpp, the projection inside the
// loop, and on a CPU with AMX the fp32 and bf16 forward at 12-32 rows csrc/cpu/
// fused_layer_tiles.cpp: fused_forward below.) The backward runs the loop in reverse (fused gate backward, then
// dh_{t-1} = dgates W_hh) and computes the weight gradients as single GEMMs over all T*B rows at
// the end.
//
// Saved states are stored in time order in [T+1, B, *] buffers: forward, state before step t is
// index t and after it t+1; reverse, before t is t+1 and after it t. So h_{prev}(t) over all steps
// is one contiguous slice (index 0..T-1 forward, 1..T reverse) for the dW_hh GEMM.
//
// lengths: rows valid at step t are those with t < lengths[b] in both directions. rows[t], the
// GEMM row count of step t, is 1 + the last valid row: the valid prefix when lengths are sorted
// in decreasing order (no work on padding); with unsorted lengths the GEMM also covers invalid
// rows below the last valid one and the kernel ignores them (masking).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops/checks.h"
#include "pyseqk/layer_kernels.h"

namespace pyseqk {
namespace ops {

using OptT = c10::optional<at::Tensor>;

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

// Row-major C[M, N] = op(A) op(B) + beta C through ATen (any device, any dtype): the fallback
// GEMM, and the CUDA one (cuBLAS on the current stream).
inline void aten_gemm(const at::TensorOptions& opts, bool ta, bool tb, int64_t M, int64_t N,
                      int64_t K, const void* A, int64_t lda, const void* B, int64_t ldb,
                      double beta, void* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    if (beta == 0) c.zero_();
    return;
  }
  auto mat = [&](const void* X, int64_t r, int64_t cols, int64_t ld, bool tr) {
    void* x = const_cast<void*>(X);
    return tr ? at::from_blob(x, {cols, r}, {ld, 1}, opts).t()
              : at::from_blob(x, {r, cols}, {ld, 1}, opts);
  };
  at::Tensor a = mat(A, M, K, lda, ta), b = mat(B, K, N, ldb, tb);
  if (beta == 0) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b);
  }
}

struct LayerLengths {
  at::Tensor dev;             // int64 [B] on the input's device, or undefined
  std::vector<int64_t> rows;  // [T]: GEMM rows of step t
  const int64_t* ptr() const { return dev.defined() ? dev.data_ptr<int64_t>() : nullptr; }
};

inline LayerLengths layer_lengths(const OptT& lengths, const at::Tensor& input) {
  const int64_t T = input.size(0), B = input.size(1);
  LayerLengths out;
  out.rows.assign(T, B);
  if (!has(lengths)) return out;
  const at::Tensor& l = *lengths;
  TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "pyseqk: lengths must be int64, got ",
                   py_dtype(l.scalar_type()));
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "pyseqk: lengths must have shape [B] = [", B,
              "], got ", l.sizes());
  TORCH_CHECK(l.device().is_cpu() || l.device() == input.device(), "pyseqk: lengths is on ",
              l.device(), " but input is on ", input.device(),
              "; expected lengths on the CPU or on the input's device");
  const at::Tensor host = l.to(at::kCPU).contiguous();
  const int64_t* v = host.data_ptr<int64_t>();
  std::vector<int64_t> last(T + 1, 0);  // last[L]: 1 + the last row of length L
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(v[b] >= 0 && v[b] <= T, "pyseqk: lengths values must be in [0, T] = [0, ", T,
                "], got lengths[", b, "] = ", v[b]);
    last[v[b]] = b + 1;
  }
  int64_t m = 0;
  for (int64_t t = T - 1; t >= 0; --t) {  // rows[t] = max over L > t of last[L]
    m = std::max(m, last[t + 1]);
    out.rows[t] = m;
  }
  out.dev = l.to(input.device()).contiguous();
  return out;
}

// Shapes: input [T, B, I], h0 [B, P], w_ih [G*H, I], w_hh [G*H, P], b_ih/b_hh [G*H].
// Returns H.
inline int64_t check_layer(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
                           int64_t gates, int64_t P_or_0) {
  to_dtype(input, "input");
  check_dim(input, 3, "input", "[T, batch, input_size]");
  check_dim(h0, 2, "h0", "[batch, hidden_size]");
  check_dim(w_ih, 2, "w_ih", "[gates * hidden_size, input_size]");
  check_dim(w_hh, 2, "w_hh", "[gates * hidden_size, hidden_size]");
  check_same(input, "input", h0, "h0");
  check_same(input, "input", w_ih, "w_ih");
  check_same(input, "input", w_hh, "w_hh");
  TORCH_CHECK(w_ih.size(0) % gates == 0, "pyseqk: w_ih must have gates * hidden_size rows (",
              gates, " gates), got shape ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / gates;
  const int64_t P = P_or_0 > 0 ? P_or_0 : H;
  TORCH_CHECK(w_hh.size(0) == gates * H && w_hh.size(1) == P, "pyseqk: w_hh must have shape [",
              gates * H, ", ", P, "], got ", w_hh.sizes());
  TORCH_CHECK(input.size(2) == w_ih.size(1), "pyseqk: input has inconsistent input_size: got ",
              input.size(2), ", expected ", w_ih.size(1), " (w_ih.shape[1])");
  TORCH_CHECK(h0.size(0) == input.size(1) && h0.size(1) == P, "pyseqk: h0 must have shape [",
              input.size(1), ", ", P, "] (input's batch, hidden_size), got ", h0.sizes());
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!has(*b)) continue;
    const char* name = b == &b_ih ? "b_ih" : "b_hh";
    check_same(input, "input", **b, name);
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == gates * H, "pyseqk: ", name,
                " must have shape [", gates * H, "], got ", (*b)->sizes());
  }
  return H;
}

// x W_ih^T + bias for all steps: [T, B, G] (bias undefined: no bias).
inline at::Tensor input_projection(const at::Tensor& input, const at::Tensor& w_ih,
                                   const at::Tensor& bias) {
  const int64_t T = input.size(0), B = input.size(1), G = w_ih.size(0);
  const at::Tensor x = input.reshape({T * B, input.size(2)});
  at::Tensor out = bias.defined() ? at::addmm(bias, x, w_ih.t()) : at::mm(x, w_ih.t());
  return out.view({T, B, G});
}

inline at::Tensor bias_sum(const OptT& a, const OptT& b) {
  if (has(a) && has(b)) return *a + *b;
  if (has(a)) return *a;
  if (has(b)) return *b;
  return at::Tensor();
}

inline const void* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Typed row pointer into a [*, B, C] buffer at time index i.
inline char* at_step(const at::Tensor& t, int64_t i) {
  return static_cast<char*>(t.data_ptr()) + i * t.stride(0) * t.element_size();
}

// Step s of a time loop over T steps: the time index t, the state slot it reads (ip, the
// previous state) and the one it writes (in). States live in [T + 1, ...] buffers; a reverse
// layer runs t = T-1 .. 0 and reads slot t + 1.
struct Slots {
  int64_t t, ip, in;
};
inline Slots slots(int64_t s, int64_t T, bool reverse) {
  const int64_t t = reverse ? T - 1 - s : s;
  return {t, reverse ? t + 1 : t, reverse ? t : t + 1};
}

// K::Weight(w, rows): a step GEMM's weight w [K, N] (row-major, contiguous or undefined) for
// GEMMs of up to `rows` rows, prepared once per op call.
// K::step_gemm(w, M, A, lda, beta, C, ldc): C[M, N] = A[M, K] w + beta C.
// K::transposed(w): w^T, contiguous (for w's transposes made once per call).
// K::time_loop(w, T, B, H, G, gemm_of, point): for s < T, the step GEMM gemm_of(s) with weight w,
// then point(s, u0, u1), the step's fused gate kernel on hidden units [u0, u1) of every row. G > 0:
// w's columns are G blocks of H, one per gate, and point needs only the columns of its units, so
// a backend may split the units between threads; G = 0: point needs the whole GEMM (0, H).
// (The CPU's time loop is in csrc/ops/layers.cpp.)

// One step GEMM's operands: C[m, N] = A[m, K] w + beta C.
struct StepGemm {
  int64_t m;
  const void* A;
  int64_t lda;
  double beta;
  void* C;
  int64_t ldc;
};

// The time loop any backend can run: one step GEMM, then the step's kernel.
template <class Weight, class StepGemmFn, class GemmOf, class Point>
void serial_time_loop(const StepGemmFn& step_gemm, const Weight& w, int64_t T, int64_t H,
                      const GemmOf& gemm_of, const Point& point) {
  for (int64_t s = 0; s < T; ++s) {
    const StepGemm g = gemm_of(s);
    step_gemm(w, g.m, g.A, g.lda, g.beta, g.C, g.ldc);
    point(s, int64_t(0), H);
  }
}

// A backward op's workspace argument t must be what the forward returned with workspace=True:
// `steps` time steps (none when the forward ran with workspace=False).
inline void check_workspace(const at::Tensor& t, const char* name, int64_t steps,
                            const char* op) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == steps, "pyseqk: ", op, ": ", name, " must have ",
              steps, " time steps, got shape ", t.sizes(),
              " (the workspace of a forward call made with workspace=True)");
}

// A layer op's workspace as returned: itself, or (workspace=False) an empty tensor of its shape
// with no time steps (not a view: that would keep the buffer alive).
inline at::Tensor returned_ws(const at::Tensor& t, bool workspace) {
  return workspace ? t : at::empty({0, t.size(1), t.size(2)}, t.options());
}

// The outputs of a layer forward in the op's order: output, h_n, c_n (LSTM), then the
// workspaces (ws: LSTM gates or the GRU's r, z, n, hn; hs, cs: the states).
struct FusedOut {
  at::Tensor out, h_n, c_n, ws, hs, cs;
};

// The CPU's whole-layer forward (K::kFusedLayer; csrc/cpu/fused_layer.cpp), for fp32 layers
// without projection in the batch sizes cpu::fused_layer_fits accepts, and bfloat16 ones where it
// takes them (bf16 products, on the tile unit or with AVX512_BF16, on fp32 copies of the operands: FusedLayer::
// bf16_products; the outputs are rounded to bf16 once, at the end): fills r and returns true,
// or returns false having done nothing. c0: LSTM only.
template <class K>
bool fused_forward(cpu::FusedLayer::Kind kind, const at::Tensor& input, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const OptT& b_ih, const OptT& b_hh, const LayerLengths& len, bool reverse,
                   bool workspace, FusedOut& r) {
  const int64_t T = input.size(0), B = input.size(1), H = w_hh.size(1);
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  if (!K::kFusedLayer || T == 0 || (input.scalar_type() != at::kFloat && !bf16) ||
      !cpu::fused_layer_fits(B, bf16)) {
    return false;
  }
  const bool lstm = kind == cpu::FusedLayer::kLstm, gru = kind == cpu::FusedLayer::kGru;
  auto opts = input.options().dtype(at::kFloat);
  auto f32 = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
  const int64_t steps = workspace ? T : 0, first = reverse ? T : 0;
  r.out = at::empty({T, B, H}, opts);
  r.h_n = at::empty({B, H}, opts);
  r.hs = at::empty({workspace ? T + 1 : 0, B, H}, opts);
  r.cs = at::empty({lstm && workspace ? T + 1 : 0, B, H}, opts);
  r.ws = at::empty({lstm || gru ? steps : 0, B, 4 * H}, opts);
  if (workspace) r.hs[first].copy_(h0);
  if (workspace && lstm) r.cs[first].copy_(c0);
  const at::Tensor h0c = f32(h0).contiguous(), c0c = lstm ? f32(c0).contiguous() : at::Tensor();
  const at::Tensor x = f32(input).contiguous(), wi = f32(w_ih).contiguous();
  const at::Tensor wh = f32(w_hh).contiguous();
  const at::Tensor bi = has(b_ih) ? f32(*b_ih).contiguous() : at::Tensor();
  const at::Tensor bh = has(b_hh) ? f32(*b_hh).contiguous() : at::Tensor();
  if (lstm) r.c_n = at::empty({B, H}, opts);
  auto fp = [](const at::Tensor& t) {
    return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr;
  };
  cpu::FusedLayer f;
  f.kind = kind;
  f.T = T;
  f.B = B;
  f.I = input.size(2);
  f.H = H;
  f.reverse = reverse;
  f.x = fp(x);
  f.h0 = fp(h0c);
  f.c0 = fp(c0c);
  f.w_ih = fp(wi);
  f.w_hh = fp(wh);
  f.b_ih = fp(bi);
  f.b_hh = fp(bh);
  f.lengths = len.ptr();
  f.out = fp(r.out);
  f.h_n = fp(r.h_n);
  f.c_n = fp(r.c_n);
  f.hs = fp(r.hs);
  f.cs = fp(r.cs);
  f.ws = fp(r.ws);
  f.bf16_products = bf16;
  K::fused_forward(f);
  if (bf16) {
    for (at::Tensor* t : {&r.out, &r.h_n, &r.c_n, &r.ws, &r.hs, &r.cs}) {
      if (t->defined()) *t = t->to(at::kBFloat16);
    }
  }
  return true;
}

template <class K>
struct Layers {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  lstm_layer(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
             const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
             const OptT& w_hr, const OptT& lengths, bool reverse, bool workspace) {
    to_dtype(input, "input");
    const bool proj = has(w_hr);
    if (proj) {
      check_dim(*w_hr, 2, "w_hr", "[proj_size, hidden_size]");
      check_same(input, "input", *w_hr, "w_hr");
    }
    const int64_t P0 = proj ? w_hr->size(0) : 0;
    const int64_t H = check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 4, P0);
    const int64_t P = proj ? P0 : H;
    if (proj) {
      TORCH_CHECK(w_hr->size(1) == H, "pyseqk: w_hr must have shape [", P, ", ", H,
                  "] (proj_size, hidden_size), got ", w_hr->sizes());
    }
    check_same(input, "input", c0, "c0");
    const int64_t T = input.size(0), B = input.size(1), G = 4 * H;
    TORCH_CHECK(c0.dim() == 2 && c0.size(0) == B && c0.size(1) == H,
                "pyseqk: c0 must have shape [", B, ", ", H, "] (input's batch, hidden_size), got ",
                c0.sizes());
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const LayerLengths len = layer_lengths(lengths, input);
    FusedOut fo;
    if (!proj && fused_forward<K>(cpu::FusedLayer::kLstm, input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                  len, reverse, workspace, fo)) {
      return {fo.out, fo.h_n, fo.c_n, fo.ws, fo.hs, fo.cs, at::empty({0, B, H}, input.options())};
    }
    auto opts = input.options();
    at::Tensor hs = at::empty({T + 1, B, P}, opts), cs = at::empty({T + 1, B, H}, opts);
    at::Tensor ms = at::empty({proj ? T : 0, B, H}, opts), out = at::empty({T, B, P}, opts);
    const int64_t first = reverse ? T : 0, last = reverse ? 0 : T;
    hs[first].copy_(h0);
    cs[first].copy_(c0);
    at::Tensor gates = input_projection(input, w_ih, bias_sum(b_ih, b_hh));
    // W^T copies [P, G], [H, P]: the step GEMMs then stream the weights row by row (axpy
    // form), which the tiny-batch GEMV needs and BLAS does not mind.
    const at::Tensor whhT = K::transposed(w_hh);
    const at::Tensor whrT = proj ? K::transposed(*w_hr) : at::Tensor();
    const typename K::Weight whhT_w(whhT, B), whrT_w(whrT, B);
    auto gemm_of = [&](int64_t s) {
      const Slots k = slots(s, T, reverse);
      return StepGemm{len.rows[k.t], at_step(hs, k.ip), P, 1.0, at_step(gates, k.t), G};
    };
    auto point = [&](int64_t s, int64_t u0, int64_t u1) {
      const auto [t, ip, in] = slots(s, T, reverse);
      K::lstm_forward_units(u0, u1, dtype, t, len.ptr(), B, H, at_step(gates, t), at_step(cs, ip),
                            at_step(cs, in), proj ? nullptr : at_step(hs, ip),
                            proj ? at_step(ms, t) : at_step(hs, in),
                            proj ? nullptr : at_step(out, t));
      if (proj) {
        K::step_gemm(whrT_w, len.rows[t], at_step(ms, t), H, 0.0, at_step(out, t), P);
        K::select_step(dtype, t, len.ptr(), B, P, at_step(out, t), at_step(hs, ip),
                       at_step(hs, in));
      }
    };
    if (B > 0) K::time_loop(whhT_w, T, B, H, proj ? 0 : 4, gemm_of, point);
    return {out, hs[last].clone(), cs[last].clone(), returned_ws(gates, workspace),
            returned_ws(hs, workspace), returned_ws(cs, workspace), returned_ws(ms, workspace)};
  }

  // grad_output [T, B, P], grad_h_n [B, P], grad_c_n [B, H]: any may be undefined (zero).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  lstm_layer_backward(const OptT& grad_output, const OptT& grad_h_n, const OptT& grad_c_n,
                      const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const OptT& w_hr, const OptT& lengths, bool reverse,
                      const at::Tensor& gates, const at::Tensor& hs, const at::Tensor& cs,
                      const at::Tensor& ms) {
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const bool proj = has(w_hr);
    const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
    const char* op = "lstm_layer_backward";
    check_workspace(gates, "gates", T, op);
    check_workspace(hs, "hs", T + 1, op);
    check_workspace(cs, "cs", T + 1, op);
    check_workspace(ms, "ms", proj ? T : 0, op);
    const int64_t H = w_ih.size(0) / 4, G = 4 * H, P = hs.size(2);
    const LayerLengths len = layer_lengths(lengths, input);
    auto opts = input.options();
    at::Tensor dh = has(grad_h_n) ? grad_h_n->contiguous().clone() : at::zeros({B, P}, opts);
    at::Tensor dh2 = at::empty({B, P}, opts);
    at::Tensor dc = has(grad_c_n) ? grad_c_n->contiguous().clone() : at::zeros({B, H}, opts);
    const at::Tensor go = has(grad_output) ? grad_output->contiguous() : at::Tensor();
    at::Tensor dG = at::empty({T, B, G}, opts);
    at::Tensor dR = at::empty({proj ? T : 0, B, P}, opts);
    at::Tensor dm = at::empty({proj ? B : 0, H}, opts);
    const at::Tensor whh = w_hh.contiguous();
    const at::Tensor whr = proj ? w_hr->contiguous() : at::Tensor();
    const typename K::Weight whh_w(whh, B), whr_w(whr, B);
    for (int64_t s = 0; s < T && B > 0; ++s) {
      const int64_t t = reverse ? s : T - 1 - s, ip = reverse ? t + 1 : t, in = reverse ? t : t + 1;
      const int64_t m = len.rows[t];
      const void* g = go.defined() ? at_step(go, t) : nullptr;
      if (proj) {
        K::grad_step(dtype, t, len.ptr(), B, P, dh.data_ptr(), g, at_step(dR, t), dh2.data_ptr());
        K::step_gemm(whr_w, m, at_step(dR, t), P, 0.0, dm.data_ptr(), H);
        K::lstm_backward_step(dtype, t, len.ptr(), B, H, at_step(gates, t), at_step(cs, ip),
                              at_step(cs, in), dm.data_ptr(), nullptr, dc.data_ptr(),
                              at_step(dG, t), nullptr);
      } else {
        K::lstm_backward_step(dtype, t, len.ptr(), B, H, at_step(gates, t), at_step(cs, ip),
                              at_step(cs, in), dh.data_ptr(), g, dc.data_ptr(), at_step(dG, t),
                              dh2.data_ptr());
      }
      K::step_gemm(whh_w, m, at_step(dG, t), G, 1.0, dh2.data_ptr(), P);
      std::swap(dh, dh2);
    }
    const at::Tensor dG2 = dG.view({T * B, G});
    const at::Tensor x = input.reshape({T * B, I});
    const at::Tensor hprev = hs.narrow(0, reverse ? 1 : 0, T).reshape({T * B, P});
    at::Tensor grad_w_hr = proj ? at::mm(dR.view({T * B, P}).t(), ms.view({T * B, H}))
                                : at::empty({0}, opts);
    return {at::mm(dG2, w_ih).view({T, B, I}), dh, dc, at::mm(dG2.t(), x),
            at::mm(dG2.t(), hprev), dG2.sum(0), grad_w_hr};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer(
      const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, const OptT& lengths,
      bool reverse, bool workspace) {
    const int64_t H = check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 3, 0);
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const int64_t T = input.size(0), B = input.size(1), G = 3 * H;
    const LayerLengths len = layer_lengths(lengths, input);
    FusedOut fo;
    if (fused_forward<K>(cpu::FusedLayer::kGru, input, h0, at::Tensor(), w_ih, w_hh, b_ih, b_hh,
                         len, reverse, workspace, fo)) {
      return {fo.out, fo.h_n, fo.ws, fo.hs};
    }
    auto opts = input.options();
    at::Tensor ws = at::empty({T, B, 4 * H}, opts);
    at::Tensor hs = at::empty({T + 1, B, H}, opts), out = at::empty({T, B, H}, opts);
    hs[reverse ? T : 0].copy_(h0);
    // r and z take both biases in the input GEMM; b_hn stays inside r * (h W_hn^T + b_hn).
    at::Tensor bias;
    if (has(b_hh)) {
      bias = at::cat({b_hh->narrow(0, 0, 2 * H), at::zeros({H}, b_hh->options())});
      if (has(b_ih)) bias = bias + *b_ih;
    } else if (has(b_ih)) {
      bias = *b_ih;
    }
    const at::Tensor b_hn = has(b_hh) ? b_hh->narrow(0, 2 * H, H).contiguous() : at::Tensor();
    const at::Tensor gi = input_projection(input, w_ih, bias);
    at::Tensor gh = at::empty({B, G}, opts);
    const at::Tensor whhT = K::transposed(w_hh);
    const typename K::Weight whhT_w(whhT, B);
    auto gemm_of = [&](int64_t s) {
      const Slots k = slots(s, T, reverse);
      return StepGemm{len.rows[k.t], at_step(hs, k.ip), H, 0.0, gh.data_ptr(), G};
    };
    auto point = [&](int64_t s, int64_t u0, int64_t u1) {
      const auto [t, ip, in] = slots(s, T, reverse);
      K::gru_forward_units(u0, u1, dtype, t, len.ptr(), B, H, at_step(gi, t), gh.data_ptr(),
                           cptr(b_hn), at_step(hs, ip), at_step(ws, t), at_step(hs, in),
                           at_step(out, t));
    };
    if (B > 0) K::time_loop(whhT_w, T, B, H, 3, gemm_of, point);
    return {out, hs[reverse ? 0 : T].clone(), returned_ws(ws, workspace),
            returned_ws(hs, workspace)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  gru_layer_backward(const OptT& grad_output, const OptT& grad_h_n, const at::Tensor& input,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& lengths,
                     bool reverse, const at::Tensor& ws, const at::Tensor& hs) {
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
    check_workspace(ws, "gates", T, "gru_layer_backward");
    check_workspace(hs, "hs", T + 1, "gru_layer_backward");
    const int64_t H = hs.size(2), G = 3 * H;
    const LayerLengths len = layer_lengths(lengths, input);
    auto opts = input.options();
    at::Tensor dh = has(grad_h_n) ? grad_h_n->contiguous().clone() : at::zeros({B, H}, opts);
    at::Tensor dh2 = at::empty({B, H}, opts);
    const at::Tensor go = has(grad_output) ? grad_output->contiguous() : at::Tensor();
    at::Tensor dgi = at::empty({T, B, G}, opts), dgh = at::empty({T, B, G}, opts);
    const at::Tensor whh = w_hh.contiguous();
    const typename K::Weight whh_w(whh, B);
    for (int64_t s = 0; s < T && B > 0; ++s) {
      const int64_t t = reverse ? s : T - 1 - s, ip = reverse ? t + 1 : t;
      K::gru_backward_step(dtype, t, len.ptr(), B, H, at_step(ws, t), at_step(hs, ip),
                           dh.data_ptr(), go.defined() ? at_step(go, t) : nullptr,
                           at_step(dgi, t), at_step(dgh, t), dh2.data_ptr());
      K::step_gemm(whh_w, len.rows[t], at_step(dgh, t), G, 1.0, dh2.data_ptr(), H);
      std::swap(dh, dh2);
    }
    const at::Tensor dgi2 = dgi.view({T * B, G}), dgh2 = dgh.view({T * B, G});
    const at::Tensor x = input.reshape({T * B, I});
    const at::Tensor hprev = hs.narrow(0, reverse ? 1 : 0, T).reshape({T * B, H});
    return {at::mm(dgi2, w_ih).view({T, B, I}), dh, at::mm(dgi2.t(), x), at::mm(dgh2.t(), hprev),
            dgi2.sum(0), dgh2.sum(0)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_layer(
      const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh, bool relu,
      const OptT& lengths, bool reverse, bool workspace) {
    const int64_t H = check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 1, 0);
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const int64_t T = input.size(0), B = input.size(1);
    const LayerLengths len = layer_lengths(lengths, input);
    FusedOut fo;
    if (fused_forward<K>(relu ? cpu::FusedLayer::kRnnRelu : cpu::FusedLayer::kRnnTanh, input, h0,
                         at::Tensor(), w_ih, w_hh, b_ih, b_hh, len, reverse, workspace, fo)) {
      return {fo.out, fo.h_n, fo.hs};
    }
    auto opts = input.options();
    at::Tensor hs = at::empty({T + 1, B, H}, opts), out = at::empty({T, B, H}, opts);
    hs[reverse ? T : 0].copy_(h0);
    at::Tensor pre = input_projection(input, w_ih, bias_sum(b_ih, b_hh));
    const at::Tensor whhT = K::transposed(w_hh);
    const typename K::Weight whhT_w(whhT, B);
    auto gemm_of = [&](int64_t s) {
      const Slots k = slots(s, T, reverse);
      return StepGemm{len.rows[k.t], at_step(hs, k.ip), H, 1.0, at_step(pre, k.t), H};
    };
    auto point = [&](int64_t s, int64_t u0, int64_t u1) {
      const auto [t, ip, in] = slots(s, T, reverse);
      K::rnn_forward_units(u0, u1, dtype, relu, t, len.ptr(), B, H, at_step(pre, t),
                           at_step(hs, ip), at_step(hs, in), at_step(out, t));
    };
    if (B > 0) K::time_loop(whhT_w, T, B, H, 1, gemm_of, point);
    return {out, hs[reverse ? 0 : T].clone(), returned_ws(hs, workspace)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  rnn_layer_backward(const OptT& grad_output, const OptT& grad_h_n, const at::Tensor& input,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, bool relu,
                     const OptT& lengths, bool reverse, const at::Tensor& hs) {
    const DType dtype = to_dtype(input, "input");
    typename K::Guard guard(input);
    const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
    check_workspace(hs, "hs", T + 1, "rnn_layer_backward");
    const int64_t H = hs.size(2);
    const LayerLengths len = layer_lengths(lengths, input);
    auto opts = input.options();
    at::Tensor dh = has(grad_h_n) ? grad_h_n->contiguous().clone() : at::zeros({B, H}, opts);
    at::Tensor dh2 = at::empty({B, H}, opts);
    const at::Tensor go = has(grad_output) ? grad_output->contiguous() : at::Tensor();
    at::Tensor dP = at::empty({T, B, H}, opts);
    const at::Tensor whh = w_hh.contiguous();
    const typename K::Weight whh_w(whh, B);
    for (int64_t s = 0; s < T && B > 0; ++s) {
      const int64_t t = reverse ? s : T - 1 - s, in = reverse ? t : t + 1;
      K::rnn_backward_step(dtype, relu, t, len.ptr(), B, H, at_step(hs, in), dh.data_ptr(),
                           go.defined() ? at_step(go, t) : nullptr, at_step(dP, t),
                           dh2.data_ptr());
      K::step_gemm(whh_w, len.rows[t], at_step(dP, t), H, 1.0, dh2.data_ptr(), H);
      std::swap(dh, dh2);
    }
    const at::Tensor dP2 = dP.view({T * B, H});
    const at::Tensor x = input.reshape({T * B, I});
    const at::Tensor hprev = hs.narrow(0, reverse ? 1 : 0, T).reshape({T * B, H});
    return {at::mm(dP2, w_ih).view({T, B, I}), dh, at::mm(dP2.t(), x), at::mm(dP2.t(), hprev),
            dP2.sum(0)};
  }

  static void register_impls(torch::Library& m) {
    m.impl("lstm_layer", &lstm_layer);
    m.impl("lstm_layer_backward", &lstm_layer_backward);
    m.impl("gru_layer", &gru_layer);
    m.impl("gru_layer_backward", &gru_layer_backward);
    m.impl("rnn_layer", &rnn_layer);
    m.impl("rnn_layer_backward", &rnn_layer_backward);
  }
};

}  // namespace ops
}  // namespace pyseqk
