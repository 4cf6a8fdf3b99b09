// The recurrent-cell gate math, written once for every backend that is C++ or CUDA.
//
// Each function is a template over a value type V: `float`/`double` in CUDA threads and scalar
// C++ tests, `at::vec::Vectorized<float>` (8 or 16 lanes) in the CPU kernels. V needs + - * and
// a specialisation of Act<V> giving sigmoid, tanh and relu. Gate order follows torch.nn:
//   LSTM: i, f, g, o    GRU: r, z, n    (chunks of the 4H / 3H gate dimension).
// Torch-free: included by .cu files and by the CMake core without any torch header.
#pragma once

#include <cmath>

#include "pyseqk/macros.h"

namespace pyseqk {
namespace math {

template <class V>
struct Act;

template <>
struct Act<float> {
  static PYSEQK_HD float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
  static PYSEQK_HD float tanh(float x) { return ::tanhf(x); }
  // x < 0 ? 0 : x, not x > 0 ? x : 0: NaN passes through as in torch.relu.
  static PYSEQK_HD float relu(float x) { return x < 0.0f ? 0.0f : x; }
  // d relu(x)/dx expressed through the output y = relu(x): 1 where y > 0.
  static PYSEQK_HD float relu_grad(float y, float g) { return y > 0.0f ? g : 0.0f; }
};

template <>
struct Act<double> {
  static PYSEQK_HD double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  static PYSEQK_HD double tanh(double x) { return ::tanh(x); }
  static PYSEQK_HD double relu(double x) { return x < 0.0 ? 0.0 : x; }
  static PYSEQK_HD double relu_grad(double y, double g) { return y > 0.0 ? g : 0.0; }
};

// ---------------------------------------------------------------------------------------------
// LSTM. Inputs are the pre-activation gate sums (x W_ih^T + b_ih + h W_hh^T + b_hh).
template <class V>
struct LstmGates {
  V i, f, g, o;  // activated gates: the workspace saved for backward
};

template <class V>
PYSEQK_HD LstmGates<V> lstm_activate(V pre_i, V pre_f, V pre_g, V pre_o) {
  return {Act<V>::sigmoid(pre_i), Act<V>::sigmoid(pre_f), Act<V>::tanh(pre_g),
          Act<V>::sigmoid(pre_o)};
}

// c' = f c + i g ; h' = o tanh(c')
template <class V>
PYSEQK_HD void lstm_state(const LstmGates<V>& a, V c_prev, V& c, V& h) {
  c = a.f * c_prev + a.i * a.g;
  h = a.o * Act<V>::tanh(c);
}

// Gradients of the pre-activation gates and of c_prev, from the saved activated gates, c_prev,
// c' and the incoming gradients dh' and dc'.
template <class V>
PYSEQK_HD void lstm_backward(const LstmGates<V>& a, V c_prev, V c, V dh, V dc_next,
                             LstmGates<V>& dpre, V& dc_prev) {
  const V one = V(1);
  const V tc = Act<V>::tanh(c);
  const V dc = dc_next + dh * a.o * (one - tc * tc);
  dpre.i = dc * a.g * a.i * (one - a.i);
  dpre.f = dc * c_prev * a.f * (one - a.f);
  dpre.g = dc * a.i * (one - a.g * a.g);
  dpre.o = dh * tc * a.o * (one - a.o);
  dc_prev = dc * a.f;
}

// ---------------------------------------------------------------------------------------------
// GRU. ir/iz/in: x W_ih^T + b_ih chunks; hr/hz/hn: h W_hh^T + b_hh chunks.
//   r = s(ir + hr), z = s(iz + hz), n = tanh(in + r hn), h' = (1 - z) n + z h
template <class V>
struct GruGates {
  V r, z, n, hn;  // the workspace saved for backward (hn: hidden part of n, bias included)
};

template <class V>
PYSEQK_HD GruGates<V> gru_activate(V ir, V iz, V in, V hr, V hz, V hn) {
  GruGates<V> a;
  a.r = Act<V>::sigmoid(ir + hr);
  a.z = Act<V>::sigmoid(iz + hz);
  a.n = Act<V>::tanh(in + a.r * hn);
  a.hn = hn;
  return a;
}

template <class V>
PYSEQK_HD V gru_state(const GruGates<V>& a, V h_prev) {
  return a.n + a.z * (h_prev - a.n);
}

// Gradients: d(pre r), d(pre z) are shared by the input and hidden gate sums; the n gate splits
// into d(in) for the input side and d(hn) = d(in) * r for the hidden side. dh_direct is the part
// of dh_prev that does not pass through W_hh.
template <class V>
struct GruGrads {
  V r, z, in, hn, h_direct;
};

template <class V>
PYSEQK_HD GruGrads<V> gru_backward(const GruGates<V>& a, V h_prev, V dh) {
  const V one = V(1);
  GruGrads<V> d;
  const V dn = dh * (one - a.z);
  const V dz = dh * (h_prev - a.n);
  d.h_direct = dh * a.z;
  d.in = dn * (one - a.n * a.n);
  d.hn = d.in * a.r;
  const V dr = d.in * a.hn;
  d.r = dr * a.r * (one - a.r);
  d.z = dz * a.z * (one - a.z);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Elman RNN: h' = act(pre); the backward is expressed through the output h'.
template <class V, bool kRelu>
PYSEQK_HD V rnn_activate(V pre) {
  if constexpr (kRelu) {
    return Act<V>::relu(pre);
  } else {
    return Act<V>::tanh(pre);
  }
}

template <class V, bool kRelu>
PYSEQK_HD V rnn_backward(V h, V dh) {
  if constexpr (kRelu) {
    return Act<V>::relu_grad(h, dh);
  } else {
    return dh * (V(1) - h * h);
  }
}

}  // namespace math
}  // namespace pyseqk
