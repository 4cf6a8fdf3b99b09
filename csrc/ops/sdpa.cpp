// Scaled dot-product attention: the op schemas, their argument checks and the CPU entry points.
// The CUDA entry points (csrc/ops/sdpa_cuda.cpp) share the checks through ops/sdpa.h.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/checks.h"
#include "ops/sdpa.h"
#include "pyseqk/sdpa_kernels.h"

namespace pyseqk {
namespace ops {

void check_sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const c10::optional<at::Tensor>& attn_mask, double dropout_p) {
  to_dtype(query, "query");
  check_dim(query, 4, "query", "[batch, heads, L, E]");
  check_dim(key, 4, "key", "[batch, kv_heads, S, E]");
  check_dim(value, 4, "value", "[batch, kv_heads, S, Ev]");
  check_same(query, "query", key, "key");
  check_same(query, "query", value, "value");
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0),
              "pyseqk: query, key and value must have one batch size, got query ", query.sizes(),
              ", key ", key.sizes(), ", value ", value.sizes());
  TORCH_CHECK(key.size(3) == query.size(3), "pyseqk: key must have the query's embedding size E = ",
              query.size(3), " in its last dimension, got key of shape ", key.sizes());
  TORCH_CHECK(value.size(1) == key.size(1), "pyseqk: value must have the key's number of heads ",
              key.size(1), ", got value of shape ", value.sizes());
  TORCH_CHECK(value.size(2) == key.size(2), "pyseqk: value must have the key's sequence length S = ",
              key.size(2), ", got value of shape ", value.sizes());
  TORCH_CHECK(key.size(1) > 0 && query.size(1) % key.size(1) == 0,
              "pyseqk: the query's number of heads (", query.size(1),
              ") must be a multiple of the key's (", key.size(1), ") (grouped-query attention)");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "pyseqk: dropout_p must be in [0, 1), got ",
              dropout_p);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == query.device(), "pyseqk: attn_mask is on ", m.device(),
                " but query is on ", query.device(), "; expected all tensors on one device");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == query.scalar_type(),
                     "pyseqk: attn_mask must be torch.bool or the query's dtype ",
                     py_dtype(query.scalar_type()), ", got ", py_dtype(m.scalar_type()));
    const int64_t want[4] = {query.size(0), query.size(1), query.size(2), key.size(2)};
    bool ok = m.dim() == 4;
    for (int64_t d = 0; ok && d < 4; ++d) ok = m.size(d) == 1 || m.size(d) == want[d];
    TORCH_CHECK(ok, "pyseqk: attn_mask must be 4-D and broadcastable to [batch, heads, L, S] = ",
                at::IntArrayRef(want, 4), ", got shape ", m.sizes());
  }
}

SdpaStrides strides_of(const at::Tensor& t) {
  // With one row the row stride is never stepped, but BLAS wants a leading dimension >= E.
  // (Nor with an empty last dimension, whose row stride may be 0.)
  const int64_t row = t.size(2) > 1 && t.size(3) > 0 ? t.stride(2) : std::max<int64_t>(1, t.size(3));
  return {t.stride(0), t.stride(1), row};
}

at::Tensor gemm_ready(const at::Tensor& t) {
  const bool ok = (t.size(3) <= 1 || t.stride(3) == 1) &&
                  (t.size(2) <= 1 || (t.stride(2) >= std::max<int64_t>(1, t.size(3)) &&
                                      t.stride(2) <= std::numeric_limits<int>::max()));
  return ok ? t : t.contiguous();
}

at::Tensor additive_mask(const c10::optional<at::Tensor>& attn_mask, at::ScalarType dtype,
                         at::IntArrayRef full) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return at::Tensor();
  // Convert only the mask's own elements (drop its broadcast dimensions first), then broadcast
  // again as a view: a [L, S] mask stays L x S however many batches and heads it serves.
  at::Tensor m = *attn_mask;
  for (int64_t d = 0; d < m.dim(); ++d) {
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);
  }
  if (m.scalar_type() == at::kBool) {
    m = at::where(m, at::zeros({}, m.options().dtype(dtype)),
                  at::full({}, -std::numeric_limits<double>::infinity(), m.options().dtype(dtype)));
  } else {
    m = m.to(dtype);
  }
  return m.expand(full);
}

SdpaArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& mask, double dropout_p, bool is_causal, double scale,
                   int64_t seed) {
  SdpaArgs a{};
  a.B = q.size(0);
  a.Hq = q.size(1);
  a.Hk = k.size(1);
  a.L = q.size(2);
  a.S = k.size(2);
  a.E = q.size(3);
  a.Ev = v.size(3);
  a.query = q.data_ptr();
  a.sq = strides_of(q);
  a.key = k.data_ptr();
  a.sk = strides_of(k);
  a.value = v.data_ptr();
  a.sv = strides_of(v);
  a.mask = mask.defined() ? mask.data_ptr() : nullptr;
  for (int d = 0; d < 4; ++d) a.mask_stride[d] = mask.defined() ? mask.stride(d) : 0;
  a.scale = scale;
  a.dropout_p = dropout_p;
  a.seed = static_cast<uint32_t>(seed);  // the hash is 32-bit: seed mod 2^32, as the reference
  a.is_causal = is_causal;
  return a;
}

namespace {

// The CPU kernels run in float32 or float64: half types are widened once here (O(N) copies,
// never an L x S buffer) and the results rounded back once.
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

DType kernel_dtype(at::ScalarType t) { return t == at::kDouble ? DType::kFloat64 : DType::kFloat32; }

std::tuple<at::Tensor, at::Tensor> sdpa_cpu(const at::Tensor& query, const at::Tensor& key,
                                            const at::Tensor& value,
                                            const c10::optional<at::Tensor>& attn_mask,
                                            double dropout_p, bool is_causal, double scale,
                                            int64_t seed) {
  check_sdpa(query, key, value, attn_mask, dropout_p);
  const auto ct = compute_type(query);
  const at::Tensor q = gemm_ready(query.to(ct)), k = gemm_ready(key.to(ct)),
                   v = gemm_ready(value.to(ct));
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  const at::Tensor mask = additive_mask(attn_mask, ct, {B, Hq, L, S});
  at::Tensor out = at::empty({B, Hq, L, Ev}, q.options());
  at::Tensor lse = at::empty({B, Hq, L}, q.options());
  if (out.numel() > 0 || lse.numel() > 0) {
    const SdpaArgs a = make_args(q, k, v, mask, dropout_p, is_causal, scale, seed);
    cpu::sdpa_forward(kernel_dtype(ct), a, out.data_ptr(), lse.data_ptr());
  }
  return {out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed) {
  check_sdpa(query, key, value, attn_mask, dropout_p);
  check_sdpa_backward(grad_out, query, key, value, out, lse);
  const auto ct = compute_type(query);
  const at::Tensor q = gemm_ready(query.to(ct)), k = gemm_ready(key.to(ct)),
                   v = gemm_ready(value.to(ct)), go = gemm_ready(grad_out.to(ct)),
                   o = gemm_ready(out.to(ct)), ls = lse.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2);
  const at::Tensor mask = additive_mask(attn_mask, ct, {B, Hq, L, S});
  at::Tensor gq = at::empty(q.sizes(), q.options());
  at::Tensor gk = at::empty(k.sizes(), k.options());
  at::Tensor gv = at::empty(v.sizes(), v.options());
  if (L == 0 || S == 0) {  // nothing attends: every gradient is zero
    gq.zero_();
    gk.zero_();
    gv.zero_();
  } else if (B > 0 && Hq > 0) {
    const SdpaArgs a = make_args(q, k, v, mask, dropout_p, is_causal, scale, seed);
    cpu::sdpa_backward(kernel_dtype(ct), a, go.data_ptr(), strides_of(go), o.data_ptr(),
                       strides_of(o),
                       ls.data_ptr(), gq.data_ptr(), gk.data_ptr(), gv.data_ptr());
  }
  return {gq.to(query.scalar_type()), gk.to(key.scalar_type()), gv.to(value.scalar_type())};
}

}  // namespace

void check_sdpa_backward(const at::Tensor& grad_out, const at::Tensor& query,
                         const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                         const at::Tensor& lse) {
  const std::vector<int64_t> want_out{query.size(0), query.size(1), query.size(2), value.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(want_out), "pyseqk: grad_out must have shape ",
              at::IntArrayRef(want_out), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want_out), "pyseqk: out must have shape ",
              at::IntArrayRef(want_out), ", got ", out.sizes());
  check_same(query, "query", grad_out, "grad_out");
  check_same(query, "query", out, "out");
  const std::vector<int64_t> want_lse{query.size(0), query.size(1), query.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(want_lse), "pyseqk: lse must have shape ",
              at::IntArrayRef(want_lse), ", got ", lse.sizes());
  const auto lse_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_type, "pyseqk: lse must be ", py_dtype(lse_type),
                   " (float64 for float64 inputs, else float32), got ", py_dtype(lse.scalar_type()));
  TORCH_CHECK(lse.device() == query.device(), "pyseqk: lse is on ", lse.device(),
              " but query is on ", query.device(), "; expected all tensors on one device");
}

TORCH_LIBRARY_FRAGMENT(pyseqk, m) {
  // lse [B, Hq, L]: natural-log logsumexp of the scaled, masked scores (+inf for rows with
  // nothing to attend), float32, or float64 for float64 inputs; the backward recomputes the
  // probabilities from it.
  m.def(
      "sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "sdpa_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, int seed) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

TORCH_LIBRARY_IMPL(pyseqk, CPU, m) {
  m.impl("sdpa", &sdpa_cpu);
  m.impl("sdpa_backward", &sdpa_backward_cpu);
}

}  // namespace ops
}  // namespace pyseqk
