// Unit tests of the shared cell math (csrc/include/pyseqk/cell_math.h) in double precision:
// forward values against closed forms, backward against central finite differences.
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>

#include "pyseqk/cell_math.h"

namespace m = pyseqk::math;

static int failures = 0;

static void expect_near(double got, double want, double tol, const char* what) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s: got %.12g want %.12g\n", what, got, want);
    ++failures;
  }
}

// d f / d x_k by central differences, for f over a vector of inputs.
static double numeric_grad(const std::function<double(std::vector<double>)>& f,
                           std::vector<double> x, size_t k) {
  const double h = 1e-6;
  x[k] += h;
  const double up = f(x);
  x[k] -= 2 * h;
  const double down = f(x);
  return (up - down) / (2 * h);
}

static double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

static void test_lstm() {
  // inputs: pre_i, pre_f, pre_g, pre_o, c_prev; outputs h and c weighted by dh, dc.
  const std::vector<double> x0 = {0.3, -1.2, 0.7, 2.0, -0.4};
  const double dh = 0.8, dc = -0.35;
  auto fwd = [](const std::vector<double>& x, double& c, double& h) {
    auto a = m::lstm_activate(x[0], x[1], x[2], x[3]);
    m::lstm_state(a, x[4], c, h);
    return a;
  };
  double c, h;
  auto a = fwd(x0, c, h);
  expect_near(c, sig(-1.2) * -0.4 + sig(0.3) * std::tanh(0.7), 1e-14, "lstm c");
  expect_near(h, sig(2.0) * std::tanh(c), 1e-14, "lstm h");
  m::LstmGates<double> d;
  double dc_prev;
  m::lstm_backward(a, x0[4], c, dh, dc, d, dc_prev);
  auto loss = [&](std::vector<double> x) {
    double cc, hh;
    fwd(x, cc, hh);
    return dh * hh + dc * cc;
  };
  const double grads[5] = {d.i, d.f, d.g, d.o, dc_prev};
  const char* names[5] = {"lstm d pre_i", "lstm d pre_f", "lstm d pre_g", "lstm d pre_o",
                          "lstm d c_prev"};
  for (size_t k = 0; k < 5; ++k) expect_near(grads[k], numeric_grad(loss, x0, k), 1e-7, names[k]);
}

static void test_gru() {
  // inputs: ir, iz, in, hr, hz, hn, h_prev
  const std::vector<double> x0 = {0.2, -0.5, 1.1, -0.3, 0.9, 0.4, 0.6};
  const double dh = 1.3;
  auto fwd = [](const std::vector<double>& x, m::GruGates<double>& a) {
    a = m::gru_activate(x[0], x[1], x[2], x[3], x[4], x[5]);
    return m::gru_state(a, x[6]);
  };
  m::GruGates<double> a;
  const double h = fwd(x0, a);
  const double r = sig(0.2 - 0.3), z = sig(-0.5 + 0.9), n = std::tanh(1.1 + r * 0.4);
  expect_near(h, (1 - z) * n + z * 0.6, 1e-14, "gru h");
  const auto d = m::gru_backward(a, x0[6], dh);
  auto loss = [&](std::vector<double> x) {
    m::GruGates<double> aa;
    return dh * fwd(x, aa);
  };
  // d(ir) = d(hr) = d.r, d(iz) = d(hz) = d.z, d(in) = d.in, d(hn) = d.hn, d(h_prev) = d.h_direct
  const double grads[7] = {d.r, d.z, d.in, d.r, d.z, d.hn, d.h_direct};
  for (size_t k = 0; k < 7; ++k) expect_near(grads[k], numeric_grad(loss, x0, k), 1e-7, "gru grad");
}

static void test_rnn() {
  for (double pre : {-0.7, 0.0001, 1.9}) {
    const double th = m::rnn_activate<double, false>(pre);
    expect_near(th, std::tanh(pre), 1e-15, "rnn tanh");
    expect_near(m::rnn_backward<double, false>(th, 2.0), 2.0 * (1 - th * th), 1e-15, "rnn tanh grad");
    const double re = m::rnn_activate<double, true>(pre);
    expect_near(re, pre > 0 ? pre : 0.0, 0, "rnn relu");
    expect_near(m::rnn_backward<double, true>(re, 2.0), pre > 0 ? 2.0 : 0.0, 0, "rnn relu grad");
  }
  // float path used by CUDA threads: saturation without NaN
  expect_near(m::Act<float>::sigmoid(-200.0f), 0.0, 1e-30, "sigmoid(-200)");
  expect_near(m::Act<float>::sigmoid(200.0f), 1.0, 1e-7, "sigmoid(200)");
  expect_near(m::Act<float>::tanh(-50.0f), -1.0, 1e-7, "tanh(-50)");
}

int main() {
  test_lstm();
  test_gru();
  test_rnn();
  if (failures) {
    std::printf("%d failed\n", failures);
    return 1;
  }
  std::printf("cell_math: all passed\n");
  return 0;
}
