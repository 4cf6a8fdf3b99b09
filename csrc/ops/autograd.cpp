// Autograd of the native cell ops in C++ (the Autograd dispatch key, every device). The same
// formulas as pyseqk/_ops.py, which keeps them for the Triton twins (triton_*): a Python autograd
// kernel costs ~3 us a call even under no_grad (torch's wrapper flattens the arguments and
// redispatches from Python), 7 % of an RNN cell step at B = 32, H = 256 and more of smaller ones;
// this one costs a few hundred nanoseconds (bench/NOTES.md, "Cells: dispatch"). The layer, SDPA
// and other ops, one call per sequence or per attention, keep their Python registrations.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace pyseqk {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The op below autograd, looked up once.
template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Saves which biases were given: their gradients are returned only for those.
void save_biases(AutogradContext* ctx, const OptTensor& b_ih, const OptTensor& b_hh) {
  ctx->saved_data["b_ih"] = given(b_ih);
  ctx->saved_data["b_hh"] = given(b_hh);
}

void bias_grads(AutogradContext* ctx, variable_list& out, const at::Tensor& g_ih,
                const at::Tensor& g_hh) {
  out.push_back(ctx->saved_data["b_ih"].toBool() ? g_ih : at::Tensor());
  out.push_back(ctx->saved_data["b_hh"].toBool() ? g_hh : at::Tensor());
}

struct LstmCell : torch::autograd::Function<LstmCell> {
  using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const OptTensor&, const OptTensor&);
  using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& cx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh) {
    static const auto fwd = op<Fwd>("pyseqk::lstm_cell");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hy, cy, ws] = fwd.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({input, hx, cx, cy, w_ih, w_hh, ws});
    save_biases(ctx, b_ih, b_hh);
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    return {hy, cy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<Bwd>("pyseqk::lstm_cell_backward");
    if (!grads[0].defined() && !grads[1].defined()) return variable_list(7);
    const variable_list s = ctx->get_saved_variables();
    auto [gi, ghx, gcx, gwi, gwh, gb] =
        bwd.call(grads[0], grads[1], s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
    variable_list out{gi, ghx, gcx, gwi, gwh};
    bias_grads(ctx, out, gb, gb);
    return out;
  }
};

struct GruCell : torch::autograd::Function<GruCell> {
  using Fwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&,
                                                 const OptTensor&, const OptTensor&);
  using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&);

  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh) {
    static const auto fwd = op<Fwd>("pyseqk::gru_cell");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [hy, ws] = fwd.call(input, hx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({input, hx, w_ih, w_hh, ws});
    save_biases(ctx, b_ih, b_hh);
    ctx->mark_non_differentiable({ws});
    ctx->set_materialize_grads(false);
    return {hy, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<Bwd>("pyseqk::gru_cell_backward");
    if (!grads[0].defined()) return variable_list(6);
    const variable_list s = ctx->get_saved_variables();
    auto [gi, ghx, gwi, gwh, gbi, gbh] = bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4]);
    variable_list out{gi, ghx, gwi, gwh};
    bias_grads(ctx, out, gbi, gbh);
    return out;
  }
};

template <bool kRelu>
struct RnnCell : torch::autograd::Function<RnnCell<kRelu>> {
  using Fwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const OptTensor&, const OptTensor&);
  using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, bool);

  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh) {
    static const auto fwd = op<Fwd>(kRelu ? "pyseqk::rnn_relu_cell" : "pyseqk::rnn_tanh_cell");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor hy = fwd.call(input, hx, w_ih, w_hh, b_ih, b_hh);
    ctx->save_for_backward({input, hx, hy, w_ih, w_hh});
    save_biases(ctx, b_ih, b_hh);
    return {hy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<Bwd>("pyseqk::rnn_cell_backward");
    const variable_list s = ctx->get_saved_variables();
    auto [gi, ghx, gwi, gwh, gb] = bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], kRelu);
    variable_list out{gi, ghx, gwi, gwh};
    bias_grads(ctx, out, gb, gb);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  auto r = LstmCell::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> gru_cell(const at::Tensor& input, const at::Tensor& hx,
                                            const at::Tensor& w_ih, const at::Tensor& w_hh,
                                            const OptTensor& b_ih, const OptTensor& b_hh) {
  auto r = GruCell::apply(input, hx, w_ih, w_hh, b_ih, b_hh);
  return {r[0], r[1]};
}

template <bool kRelu>
at::Tensor rnn_cell(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  return RnnCell<kRelu>::apply(input, hx, w_ih, w_hh, b_ih, b_hh)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, Autograd, m) {
  m.impl("lstm_cell", &lstm_cell);
  m.impl("gru_cell", &gru_cell);
  m.impl("rnn_tanh_cell", &rnn_cell<false>);
  m.impl("rnn_relu_cell", &rnn_cell<true>);
}

}  // namespace ops
}  // namespace pyseqk
