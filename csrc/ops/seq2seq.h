// at::Tensor entry points of the seq2seq attention ops, written once for every device: `K`
// supplies the fused kernels (csrc/cpu/seq2seq.cpp, csrc/cuda/seq2seq.cu), ATen the GEMMs of the
// backward. Shapes: query/wq [B, Tq, D], keys/uk [B, Tk, D], values [B, Tk, Hv], v [D],
// key_padding_mask bool [B, Tk] (true = padding), context [B, Tq, Hv], weights [B, Tq, Tk].
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "ops/checks.h"
#include "pyseqk/seq2seq_kernels.h"

namespace pyseqk {
namespace ops {
namespace seq2seq {

using OptTensor = c10::optional<at::Tensor>;

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The checks every seq2seq op shares (pyseqk/functional.py _check_seq2seq mirrors them, message
// for message, for the Python backends). q/k are the two sides of the score.
inline DType check_attention(const at::Tensor& q, const char* qn, const at::Tensor& k,
                             const char* kn, const at::Tensor& values, const OptTensor& mask) {
  const DType dtype = to_dtype(q, qn);
  check_dim(q, 3, qn, "[batch, query_len, features]");
  check_dim(k, 3, kn, "[batch, key_len, features]");
  check_dim(values, 3, "values", "[batch, key_len, value_size]");
  check_same(q, qn, k, kn);
  check_same(q, qn, values, "values");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "pyseqk: ", kn,
              " must have shape [", q.size(0), ", key_len, ", q.size(2), "] (batch and features of ",
              qn, "), got ", k.sizes());
  TORCH_CHECK(values.size(0) == k.size(0) && values.size(1) == k.size(1),
              "pyseqk: values must have shape [", k.size(0), ", ", k.size(1),
              ", value_size] (batch and key_len of ", kn, "), got ", values.sizes());
  if (has(mask)) {
    TORCH_CHECK(mask->device() == q.device(), "pyseqk: key_padding_mask is on ", mask->device(),
                " but ", qn, " is on ", q.device(), "; expected all tensors on one device");
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool,
                     "pyseqk: key_padding_mask must be a bool tensor (True = padding), got ",
                     py_dtype(mask->scalar_type()));
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == k.size(0) && mask->size(1) == k.size(1),
                "pyseqk: key_padding_mask must have shape [", k.size(0), ", ", k.size(1),
                "] ([batch, key_len]), got ", mask->sizes());
  }
  return dtype;
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// d loss / d score, in the math dtype: the softmax backward of dP = grad_weights + grad_context
// values^T. Masked keys and fully masked rows have weight 0, hence ds = 0.
inline at::Tensor score_grad(const OptTensor& grad_context, const OptTensor& grad_weights,
                             const at::Tensor& values, const at::Tensor& weights) {
  const auto acc = acc_type(weights);
  const at::Tensor p = weights.to(acc);
  at::Tensor dp;
  if (has(grad_weights)) dp = grad_weights->to(acc);
  if (has(grad_context)) {
    at::Tensor g = at::bmm(grad_context->to(acc), values.to(acc).transpose(1, 2));
    dp = dp.defined() ? dp + g : g;
  }
  if (!dp.defined()) return at::zeros_like(p);
  return p * (dp - (p * dp).sum(-1, true));
}

inline at::Tensor values_grad(const OptTensor& grad_context, const at::Tensor& values,
                              const at::Tensor& weights) {
  if (!has(grad_context)) return at::zeros_like(values);
  const auto acc = acc_type(weights);
  return at::bmm(weights.to(acc).transpose(1, 2), grad_context->to(acc)).to(values.scalar_type());
}

// The raw-score workspace of the kernels that need one (K::kScratch), else nothing.
template <class K>
inline at::Tensor scratch_for(const at::Tensor& q, int64_t B, int64_t Tq, int64_t Tk) {
  if (!K::kScratch) return at::Tensor();
  return at::empty({B, Tq, Tk}, q.options().dtype(acc_type(q)));
}

// The CUDA kernels run one block per query row (forward) and per key row (backward).
template <class K>
inline void check_rows(int64_t rows, const char* what) {
  TORCH_CHECK(rows <= K::kMaxRows, "pyseqk: ", what, " = ", rows,
              " exceeds this backend's limit of ", K::kMaxRows, " rows");
}

inline void* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline const bool* mask_ptr(const at::Tensor& m) { return m.defined() ? m.data_ptr<bool>() : nullptr; }

template <class K>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor> luong_attention(const at::Tensor& query,
                                                            const at::Tensor& keys,
                                                            const at::Tensor& values,
                                                            const OptTensor& key_padding_mask) {
    const DType dtype = check_attention(query, "query", keys, "keys", values, key_padding_mask);
    typename K::Guard guard(query);
    const int64_t B = query.size(0), Tq = query.size(1), Tk = keys.size(1), D = query.size(2),
                  Hv = values.size(2);
    at::Tensor context = at::empty({B, Tq, Hv}, query.options());
    at::Tensor weights = at::empty({B, Tq, Tk}, query.options());
    const at::Tensor q = query.contiguous(), k = keys.contiguous(), v = values.contiguous();
    const at::Tensor m = has(key_padding_mask) ? key_padding_mask->contiguous() : at::Tensor();
    check_rows<K>(B * Tq, "batch * query_len");
    if (B * Tq > 0) {
      const at::Tensor scratch = scratch_for<K>(q, B, Tq, Tk);
      K::luong_attention_forward(dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), mask_ptr(m),
                                 context.data_ptr(), weights.data_ptr(), opt_ptr(scratch), B, Tq,
                                 Tk, D, Hv);
    }
    return {context, weights};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> luong_attention_backward(
      const OptTensor& grad_context, const OptTensor& grad_weights, const at::Tensor& query,
      const at::Tensor& keys, const at::Tensor& values, const at::Tensor& weights) {
    // Three GEMMs and a softmax backward: ATen's are as fused as it gets on either device.
    const at::Tensor ds = score_grad(grad_context, grad_weights, values, weights);
    const auto acc = ds.scalar_type();
    return {at::bmm(ds, keys.to(acc)).to(query.scalar_type()),
            at::bmm(ds.transpose(1, 2), query.to(acc)).to(keys.scalar_type()),
            values_grad(grad_context, values, weights)};
  }

  static std::tuple<at::Tensor, at::Tensor> bahdanau_attention(const at::Tensor& wq,
                                                               const at::Tensor& uk,
                                                               const at::Tensor& v,
                                                               const at::Tensor& values,
                                                               const OptTensor& key_padding_mask) {
    const DType dtype = check_attention(wq, "wq", uk, "uk", values, key_padding_mask);
    check_same(wq, "wq", v, "v");
    TORCH_CHECK(v.dim() == 1 && v.size(0) == wq.size(2), "pyseqk: v must have shape [",
                wq.size(2), "] ([units], Va.weight flattened), got ", v.sizes());
    typename K::Guard guard(wq);
    const int64_t B = wq.size(0), Tq = wq.size(1), Tk = uk.size(1), D = wq.size(2),
                  Hv = values.size(2);
    at::Tensor context = at::empty({B, Tq, Hv}, wq.options());
    at::Tensor weights = at::empty({B, Tq, Tk}, wq.options());
    const at::Tensor a = wq.contiguous(), b = uk.contiguous(), vv = v.contiguous(),
                     val = values.contiguous();
    const at::Tensor m = has(key_padding_mask) ? key_padding_mask->contiguous() : at::Tensor();
    check_rows<K>(B * Tq, "batch * query_len");
    if (B * Tq > 0) {
      const at::Tensor scratch = scratch_for<K>(a, B, Tq, Tk);
      K::bahdanau_attention_forward(dtype, a.data_ptr(), b.data_ptr(), vv.data_ptr(),
                                    val.data_ptr(), mask_ptr(m), context.data_ptr(),
                                    weights.data_ptr(), opt_ptr(scratch), B, Tq, Tk, D, Hv);
    }
    return {context, weights};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bahdanau_attention_backward(
      const OptTensor& grad_context, const OptTensor& grad_weights, const at::Tensor& wq,
      const at::Tensor& uk, const at::Tensor& v, const at::Tensor& values,
      const at::Tensor& weights) {
    const DType dtype = to_dtype(wq, "wq");
    typename K::Guard guard(wq);
    const int64_t B = wq.size(0), Tq = wq.size(1), Tk = uk.size(1), D = wq.size(2);
    const at::Tensor ds = score_grad(grad_context, grad_weights, values, weights).contiguous();
    const auto opts = wq.options().dtype(ds.scalar_type());
    at::Tensor dwq = at::zeros({B, Tq, D}, opts);
    at::Tensor duk = at::zeros({B, Tk, D}, opts);
    at::Tensor dv = at::zeros({D}, opts);
    check_rows<K>(B * Tq, "batch * query_len");
    check_rows<K>(B * Tk, "batch * key_len");
    if (B * Tq * Tk * D > 0) {
      const at::Tensor a = wq.contiguous(), b = uk.contiguous(), vv = v.contiguous();
      K::bahdanau_attention_backward(dtype, a.data_ptr(), b.data_ptr(), vv.data_ptr(),
                                     ds.data_ptr(), dwq.data_ptr(), duk.data_ptr(), dv.data_ptr(),
                                     B, Tq, Tk, D);
    }
    const auto t = wq.scalar_type();
    return {dwq.to(t), duk.to(t), dv.to(t), values_grad(grad_context, values, weights)};
  }

  static void register_impls(torch::Library& m) {
    m.impl("luong_attention", &luong_attention);
    m.impl("luong_attention_backward", &luong_attention_backward);
    m.impl("bahdanau_attention", &bahdanau_attention);
    m.impl("bahdanau_attention_backward", &bahdanau_attention_backward);
  }
};

}  // namespace seq2seq
}  // namespace ops
}  // namespace pyseqk
