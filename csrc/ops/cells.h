// at::Tensor entry points of the cell ops, written once for every device: `K` supplies the
// fused kernels (the CPU ones in csrc/cpu, the CUDA ones in csrc/cuda), ATen supplies the GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

#include "ops/checks.h"

namespace pyseqk {
namespace ops {

using OptTensor = c10::optional<at::Tensor>;

// Shapes (torch's own messages where torch has one):
//   input [B, I], hx [B, H], w_ih [G*H, I], w_hh [G*H, H], b_ih/b_hh [G*H]
inline DType check_cell(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                        int64_t gates) {
  const DType dtype = to_dtype(input, "input");
  check_dim(input, 2, "input", "[batch, input_size]");
  check_dim(hx, 2, "hx", "[batch, hidden_size]");
  check_dim(w_ih, 2, "w_ih", "[gates * hidden_size, input_size]");
  check_dim(w_hh, 2, "w_hh", "[gates * hidden_size, hidden_size]");
  check_same(input, "input", hx, "hx");
  check_same(input, "input", w_ih, "w_ih");
  check_same(input, "input", w_hh, "w_hh");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_hh.size(0) == gates * H, "pyseqk: w_hh must have shape [", gates * H, ", ", H,
              "], got ", w_hh.sizes());
  TORCH_CHECK(w_ih.size(0) == gates * H, "pyseqk: w_ih must have ", gates * H,
              " rows (gates * hidden_size), got shape ", w_ih.sizes());
  // torch's words first (code that matches them keeps working), then the arguments involved.
  TORCH_CHECK(input.size(1) == w_ih.size(1), "input has inconsistent input_size: got ",
              input.size(1), " expected ", w_ih.size(1), " (input is ", input.sizes(),
              ", w_ih is ", w_ih.sizes(), ")");
  TORCH_CHECK(input.size(0) == hx.size(0), "Input batch size ", input.size(0),
              " doesn't match hidden0 batch size ", hx.size(0), " (input is ", input.sizes(),
              ", hx is ", hx.sizes(), ")");
  TORCH_CHECK(hx.size(1) == H, "hidden0 has inconsistent hidden_size: got ", hx.size(1),
              ", expected ", H, " (hx is ", hx.sizes(), ", w_hh is ", w_hh.sizes(), ")");
  for (const auto* b : {&b_ih, &b_hh}) {
    if (!b->has_value() || !(*b)->defined()) continue;
    const char* name = b == &b_ih ? "b_ih" : "b_hh";
    check_same(input, "input", **b, name);
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == gates * H, "pyseqk: ", name,
                " must have shape [", gates * H, "], got ", (*b)->sizes());
  }
  return dtype;
}

// The backward ops are public ops too (torch.ops.pyseqk.*_backward): every tensor the kernels
// index is checked against the forward's shapes, so a wrong call raises instead of reading or
// writing past a buffer.
inline DType check_cell_backward(const at::Tensor& input, const at::Tensor& hx,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t gates,
                                 std::initializer_list<std::pair<const char*, const at::Tensor*>>
                                     others,
                                 std::initializer_list<std::pair<const char*, const at::Tensor*>>
                                     workspaces,
                                 int64_t ws_cols) {
  const DType dtype = check_cell(input, hx, w_ih, w_hh, c10::nullopt, c10::nullopt, gates);
  const int64_t B = input.size(0), H = hx.size(1);
  for (const auto& [name, t] : others) {
    if (!t->defined()) continue;
    check_same(input, "input", *t, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == H, "pyseqk: ", name,
                " must have shape [", B, ", ", H, "], got ", t->sizes());
  }
  for (const auto& [name, t] : workspaces) {
    check_same(input, "input", *t, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == ws_cols * H, "pyseqk: ", name,
                " must have shape [", B, ", ", ws_cols * H, "], got ", t->sizes());
  }
  return dtype;
}

inline at::Tensor contig(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

inline const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The parameter gradients every cell backward shares: dgi/dgh are the gradients of the input-
// and hidden-side gate sums (the same tensor for LSTM and RNN), dh_direct the part of dhx that
// bypasses W_hh (GRU) or undefined.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cell_gemm_backward(const at::Tensor& dgi, const at::Tensor& dgh, const at::Tensor& dh_direct,
                   const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh) {
  at::Tensor grad_input = at::mm(dgi, w_ih);
  at::Tensor grad_hx = dh_direct.defined() ? at::addmm(dh_direct, dgh, w_hh) : at::mm(dgh, w_hh);
  at::Tensor grad_w_ih = at::mm(dgi.t(), input);
  at::Tensor grad_w_hh = at::mm(dgh.t(), hx);
  at::Tensor grad_b_ih = dgi.sum(0);
  at::Tensor grad_b_hh = dgh.is_same(dgi) ? grad_b_ih : dgh.sum(0);
  return {grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

// out [B, N] (a view with unit column stride) = a [B, Ka] wa^T (+ b [B, Kb] wb^T when b is
// defined): the kernel set's small-batch path where it takes the shape, else ATen's GEMM.
template <class K>
void gate_sums(at::Tensor& out, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& b,
               const at::Tensor& wb) {
  const int64_t B = a.size(0), N = wa.size(0);
  if (B <= K::kMaxSmallBatch && a.is_contiguous() && wa.is_contiguous() &&
      (!b.defined() || (b.is_contiguous() && wb.is_contiguous())) && out.stride(1) == 1 &&
      K::small_batch_gates(to_dtype(a, "input"), a.data_ptr(), wa.data_ptr(), a.size(1),
                           b.defined() ? b.data_ptr() : nullptr,
                           b.defined() ? wb.data_ptr() : nullptr, b.defined() ? b.size(1) : 0,
                           out.data_ptr(), out.stride(0), B, N)) {
    return;
  }
  at::mm_out(out, a, wa.t());
  if (b.defined()) out.addmm_(b, wb.t());
}

// The gate sums of a forward cell kernel: ws [B, cols] = [a wa^T | b wb^T] (stacked: GRU) or
// a wa^T + b wb^T. The kernel set may stage them for its forward kernel instead (K::stage_sums:
// the CPU one for float32 batches, see csrc/ops/cpu.cpp), which then computes them or moves them
// into ws itself; returns whether it did.
template <class K>
bool cell_gate_sums(typename K::Staged& staged, at::Tensor& ws, const at::Tensor& a,
                    const at::Tensor& wa, const at::Tensor& b, const at::Tensor& wb, bool stacked) {
  if constexpr (K::kTransposedSums) {
    if (K::stage_sums(staged, a, wa, b, wb, stacked)) return true;
  }
  if (stacked) {
    at::Tensor top = ws.narrow(1, 0, wa.size(0)), bottom = ws.narrow(1, wa.size(0), wb.size(0));
    gate_sums<K>(top, a, wa, at::Tensor(), at::Tensor());
    gate_sums<K>(bottom, b, wb, at::Tensor(), at::Tensor());
  } else {
    gate_sums<K>(ws, a, wa, b, wb);
  }
  return false;
}

// Calls a forward cell kernel, with the staged sums where the kernel set takes them.
template <class K, class F, class... Args>
void forward_kernel(const F& kernel, bool is_staged, const typename K::Staged& staged,
                    Args... args) {
  if constexpr (K::kTransposedSums) {
    kernel(args..., is_staged ? &staged.desc : nullptr);
  } else {
    kernel(args...);
  }
}

template <class K>
struct Cells {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell(
      const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    const DType dtype = check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 4);
    check_same(input, "input", cx, "cx");
    TORCH_CHECK(cx.sizes() == hx.sizes(), "pyseqk: cx must have the shape of hx ", hx.sizes(),
                ", got ", cx.sizes());
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor ws = at::empty({B, 4 * H}, input.options());
    typename K::Staged staged;
    const bool is_staged = cell_gate_sums<K>(staged, ws, input, w_ih, hx, w_hh, false);
    at::Tensor hy = at::empty({B, H}, input.options());
    at::Tensor cy = at::empty({B, H}, input.options());
    const at::Tensor cxc = cx.contiguous(), bi = contig(b_ih), bh = contig(b_hh);
    if (B * H > 0) {
      forward_kernel<K>(K::lstm_cell_forward, is_staged, staged, dtype, ws.data_ptr(), ptr(bi),
                        ptr(bh), cxc.data_ptr(), hy.data_ptr(), cy.data_ptr(), B, H);
    }
    return {hy, cy, ws};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  lstm_cell_backward(const OptTensor& grad_hy, const OptTensor& grad_cy, const at::Tensor& input,
                     const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& cy,
                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
    const at::Tensor dhy = contig(grad_hy), dcy = contig(grad_cy);
    const DType dtype = check_cell_backward(
        input, hx, w_ih, w_hh, 4, {{"grad_hy", &dhy}, {"grad_cy", &dcy}, {"cx", &cx}, {"cy", &cy}},
        {{"workspace", &ws}}, 4);
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor dgates = at::empty({B, 4 * H}, input.options());
    at::Tensor dcx = at::empty({B, H}, input.options());
    if (B * H > 0) {
      K::lstm_cell_backward(dtype, ws.contiguous().data_ptr(), cx.contiguous().data_ptr(),
                            cy.contiguous().data_ptr(), ptr(dhy), ptr(dcy), dgates.data_ptr(),
                            dcx.data_ptr(), B, H);
    }
    auto g = cell_gemm_backward(dgates, dgates, at::Tensor(), input, hx, w_ih, w_hh);
    return {std::get<0>(g), std::get<1>(g), dcx, std::get<2>(g), std::get<3>(g), std::get<4>(g)};
  }

  static std::tuple<at::Tensor, at::Tensor> gru_cell(const at::Tensor& input,
                                                     const at::Tensor& hx, const at::Tensor& w_ih,
                                                     const at::Tensor& w_hh,
                                                     const OptTensor& b_ih, const OptTensor& b_hh) {
    const DType dtype = check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 3);
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor ws = at::empty({B, 6 * H}, input.options());
    typename K::Staged staged;
    const bool is_staged = cell_gate_sums<K>(staged, ws, input, w_ih, hx, w_hh, true);
    at::Tensor hy = at::empty({B, H}, input.options());
    const at::Tensor hxc = hx.contiguous(), bi = contig(b_ih), bh = contig(b_hh);
    if (B * H > 0) {
      forward_kernel<K>(K::gru_cell_forward, is_staged, staged, dtype, ws.data_ptr(), ptr(bi),
                        ptr(bh), hxc.data_ptr(), hy.data_ptr(), B, H);
    }
    return {hy, ws};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  gru_cell_backward(const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
    const DType dtype = check_cell_backward(input, hx, w_ih, w_hh, 3, {{"grad_hy", &grad_hy}},
                                            {{"workspace", &ws}}, 6);
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor dgi = at::empty({B, 3 * H}, input.options());
    at::Tensor dgh = at::empty({B, 3 * H}, input.options());
    at::Tensor dh_direct = at::empty({B, H}, input.options());
    if (B * H > 0) {
      K::gru_cell_backward(dtype, ws.contiguous().data_ptr(), hx.contiguous().data_ptr(),
                           grad_hy.contiguous().data_ptr(), dgi.data_ptr(), dgh.data_ptr(),
                           dh_direct.data_ptr(), B, H);
    }
    return cell_gemm_backward(dgi, dgh, dh_direct, input, hx, w_ih, w_hh);
  }

  template <bool kRelu>
  static at::Tensor rnn_cell(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    const DType dtype = check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 1);
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor hy = at::empty({B, H}, input.options());
    typename K::Staged staged;
    const bool is_staged = cell_gate_sums<K>(staged, hy, input, w_ih, hx, w_hh, false);
    const at::Tensor bi = contig(b_ih), bh = contig(b_hh);
    if (B * H > 0) {
      forward_kernel<K>(K::rnn_cell_forward, is_staged, staged, dtype, kRelu, hy.data_ptr(),
                        ptr(bi), ptr(bh), B, H);
    }
    return hy;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward(
      const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
      const at::Tensor& hy, const at::Tensor& w_ih, const at::Tensor& w_hh, bool relu) {
    const DType dtype = check_cell_backward(input, hx, w_ih, w_hh, 1,
                                            {{"grad_hy", &grad_hy}, {"hy", &hy}}, {}, 1);
    typename K::Guard guard(input);
    const int64_t B = input.size(0), H = hx.size(1);
    at::Tensor dpre = at::empty({B, H}, input.options());
    if (B * H > 0) {
      K::rnn_cell_backward(dtype, relu, hy.contiguous().data_ptr(),
                           grad_hy.contiguous().data_ptr(), dpre.data_ptr(), B, H);
    }
    auto g = cell_gemm_backward(dpre, dpre, at::Tensor(), input, hx, w_ih, w_hh);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g)};
  }

  static void register_impls(torch::Library& m) {
    m.impl("lstm_cell", &lstm_cell);
    m.impl("lstm_cell_backward", &lstm_cell_backward);
    m.impl("gru_cell", &gru_cell);
    m.impl("gru_cell_backward", &gru_cell_backward);
    m.impl("rnn_tanh_cell", &rnn_cell<false>);
    m.impl("rnn_relu_cell", &rnn_cell<true>);
    m.impl("rnn_cell_backward", &rnn_cell_backward);
  }
};

}  // namespace ops
}  // namespace pyseqk
