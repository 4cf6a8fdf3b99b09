// CUDA implementations of pyseqk::sdpa and pyseqk::sdpa_backward (schemas in csrc/ops/sdpa.cpp):
// argument checks, device guard, current stream, and the launchers of csrc/cuda/sdpa.cu.
// Compiled only into the CUDA build.
#ifdef PYSEQK_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "ops/checks.h"
#include "pyseqk/sdpa_cuda.h"

namespace pyseqk {
namespace ops {
namespace {

struct SdpaShape {
  int64_t B, Hq, Hk, L, S, E, Ev;
};

SdpaShape check_sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const c10::optional<at::Tensor>& attn_mask, double dropout_p, double scale) {
  check_dim(query, 4, "query", "[batch, heads, L, E]");
  check_dim(key, 4, "key", "[batch, kv_heads, S, E]");
  check_dim(value, 4, "value", "[batch, kv_heads, S, Ev]");
  to_dtype(query, "query");
  TORCH_CHECK(query.is_cuda(), "pyseqk: query must be a CUDA tensor for the cuda backend, got ",
              query.device());
  check_same(query, "query", key, "key");
  check_same(query, "query", value, "value");
  const SdpaShape s{query.size(0), query.size(1), key.size(1), query.size(2),
                    key.size(2),   query.size(3), value.size(3)};
  TORCH_CHECK(key.size(0) == s.B && key.size(3) == s.E, "pyseqk: key must have shape [", s.B,
              ", Hk, S, ", s.E, "] to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK(value.size(0) == s.B && value.size(1) == s.Hk && value.size(2) == s.S,
              "pyseqk: value must have shape [", s.B, ", ", s.Hk, ", ", s.S,
              ", Ev] to match key ", key.sizes(), ", got ", value.sizes());
  TORCH_CHECK(s.Hk > 0 && s.Hq % s.Hk == 0, "pyseqk: query heads (", s.Hq,
              ") must be a multiple of key/value heads (", s.Hk, ")");
  TORCH_CHECK(s.E <= cuda::kSdpaMaxHeadDim && s.Ev <= cuda::kSdpaMaxHeadDim,
              "pyseqk: head dims up to ", cuda::kSdpaMaxHeadDim, " are supported, got E=", s.E,
              ", Ev=", s.Ev);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == query.scalar_type(),
                     "pyseqk: attn_mask must be bool or ", py_dtype(query.scalar_type()),
                     " (the query's dtype), got ", py_dtype(m.scalar_type()));
    TORCH_CHECK(m.dim() == 4 && m.size(0) == s.B && m.size(1) == s.Hq && m.size(2) == s.L &&
                    m.size(3) == s.S,
                "pyseqk: attn_mask must be expanded to [B, Hq, L, S] = [", s.B, ", ", s.Hq, ", ",
                s.L, ", ", s.S, "], got ", m.sizes());
    TORCH_CHECK(m.device() == query.device(), "pyseqk: attn_mask is on ", m.device(),
                " but query is on ", query.device(), "; expected all tensors on one device");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "pyseqk: dropout_p must be in [0, 1], got ",
              dropout_p);
  TORCH_CHECK(std::isfinite(scale), "pyseqk: scale must be finite, got ", scale);
  // The kernels use one flat grid of (row block, b * h) blocks of at least 16 rows.
  TORCH_CHECK(s.B * s.Hq * ((s.L + 15) / 16) < (int64_t(1) << 31) &&
                  s.B * s.Hk * ((s.S + 15) / 16) < (int64_t(1) << 31),
              "pyseqk: sdpa on CUDA takes fewer than 2^31 blocks of 16 rows per launch, got B=",
              s.B, " Hq=", s.Hq, " L=", s.L, " S=", s.S);
  return s;
}

void copy4(int64_t dst[4], const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

cuda::SdpaParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& attn_mask, const SdpaShape& s,
                             double dropout_p, bool is_causal, double scale, int64_t seed) {
  cuda::SdpaParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy4(p.q_stride, q);
  copy4(p.k_stride, k);
  copy4(p.v_stride, v);
  if (attn_mask.has_value() && attn_mask->defined()) {
    p.mask = attn_mask->data_ptr();
    copy4(p.mask_stride, *attn_mask);
    p.mask_kind = attn_mask->scalar_type() == at::kBool ? cuda::MaskKind::kBool
                                                          : cuda::MaskKind::kAdditive;
  }
  p.B = s.B, p.Hq = s.Hq, p.Hk = s.Hk, p.L = s.L, p.S = s.S, p.E = s.E, p.Ev = s.Ev;
  p.is_causal = is_causal;
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFu);  // as reference.py
  return p;
}

std::tuple<at::Tensor, at::Tensor> sdpa_cuda(const at::Tensor& query, const at::Tensor& key,
                                             const at::Tensor& value,
                                             const c10::optional<at::Tensor>& attn_mask,
                                             double dropout_p, bool is_causal, double scale,
                                             int64_t seed) {
  const SdpaShape s = check_sdpa(query, key, value, attn_mask, dropout_p, scale);
  c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({s.B, s.Hq, s.L, s.Ev}, query.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, query.options().dtype(at::kFloat));
  const cuda::SdpaParams p =
      make_params(query, key, value, attn_mask, s, dropout_p, is_causal, scale, seed);
  cuda::sdpa_forward(to_dtype(query, "query"), p, out.data_ptr(), lse.data_ptr<float>(),
                     at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed) {
  const SdpaShape s = check_sdpa(query, key, value, attn_mask, dropout_p, scale);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    check_same(query, "query", t, name);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == s.B && t.size(1) == s.Hq && t.size(2) == s.L &&
                    t.size(3) == s.Ev,
                "pyseqk: ", name, " must have shape [", s.B, ", ", s.Hq, ", ", s.L, ", ", s.Ev,
                "], got ", t.sizes());
  }
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "pyseqk: lse must be torch.float32, got ",
                   py_dtype(lse.scalar_type()));
  TORCH_CHECK(lse.device() == query.device() && lse.dim() == 3 && lse.size(0) == s.B &&
                  lse.size(1) == s.Hq && lse.size(2) == s.L,
              "pyseqk: lse must have shape [", s.B, ", ", s.Hq, ", ", s.L, "] on ", query.device(),
              ", got ", lse.sizes(), " on ", lse.device());
  c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty_like(query, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(key, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(value, at::MemoryFormat::Contiguous);
  at::Tensor delta = at::empty({s.B, s.Hq, s.L}, query.options().dtype(at::kFloat));
  const cuda::SdpaParams p =
      make_params(query, key, value, attn_mask, s, dropout_p, is_causal, scale, seed);
  int64_t go_stride[4], out_stride[4];
  copy4(go_stride, grad_out);
  copy4(out_stride, out);
  cuda::sdpa_backward(to_dtype(query, "query"), p, grad_out.data_ptr(), go_stride, out.data_ptr(),
                      out_stride, lse_c.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr(),
                      dk.data_ptr(), dv.data_ptr(), at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseqk, CUDA, m) {
  m.impl("sdpa", &sdpa_cuda);
  m.impl("sdpa_backward", &sdpa_backward_cuda);
}

}  // namespace ops
}  // namespace pyseqk

#endif  // PYSEQK_WITH_CUDA
