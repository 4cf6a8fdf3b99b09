// The schemas of every pyseqk op, written once; the per-device implementations register in
// cpu.cpp and cuda.cpp. Also the Python module init that lets `import pyseqk._C` load them.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef PYSEQK_CPU_ISA
#define PYSEQK_CPU_ISA "default"
#endif

namespace {

std::string build_info() {
  std::string s = "{\"cpu_isa\": \"" PYSEQK_CPU_ISA "\", \"cuda\": ";
#ifdef PYSEQK_WITH_CUDA
  s += "true, \"cuda_archs\": \"" PYSEQK_CUDA_ARCHS "\"";
#else
  s += "false, \"cuda_archs\": \"\"";
#endif
  return s + "}";
}

}  // namespace

TORCH_LIBRARY(pyseqk, m) {
  m.def("build_info() -> str", &build_info);

  // Cells. workspace: what backward needs (activated gates), an output so autograd can save it.
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, "
      "Tensor cy, Tensor w_ih, Tensor w_hh, Tensor workspace) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def(
      "gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor hy, Tensor workspace)");
  m.def(
      "gru_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, "
      "Tensor workspace) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh)");
  m.def(
      "rnn_tanh_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> Tensor");
  m.def(
      "rnn_relu_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> Tensor");
  m.def(
      "rnn_cell_backward(Tensor grad_hy, Tensor input, Tensor hx, Tensor hy, Tensor w_ih, "
      "Tensor w_hh, bool relu) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias)");
}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
