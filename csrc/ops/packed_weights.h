// The CPU cells' packed weights (csrc/cpu/packed_gemm.h), cached across calls: a time loop calls
// a cell with the same weights every step, and packing them costs about as much as one step.
//
// An entry is keyed by the weight tensors themselves (a weak reference keeps each TensorImpl's
// address from being reused while the entry exists), their data pointers (`param.data = ...`
// swaps storage without a version bump) and their version counters (any in-place change, an
// optimizer step included, bumps them). Inference tensors have no version counter: they are not
// cached (the caller falls back to ATen's GEMM).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <mutex>

#include "cpu/packed_gemm.h"

namespace pyseqk {
namespace ops {

class PackedWeightCache {
 public:
  // Packed [w1 | w2] (w2 may be undefined), or an undefined tensor when it cannot be cached.
  at::Tensor get(const at::Tensor& w1, const at::Tensor& w2) {
    if (!cacheable(w1) || (w2.defined() && !cacheable(w2))) return at::Tensor();
    const Key key = make_key(w1, w2);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& e : entries_) {
      if (e.packed.defined() && e.key.same(key)) return e.packed;
    }
    const int64_t N = w1.size(0), K1 = w1.size(1), K2 = w2.defined() ? w2.size(1) : 0;
    at::Tensor packed = at::empty({cpu::packed_gemm_size(N, K1, K2)}, w1.options());
    cpu::packed_gemm_pack(w1.const_data_ptr<float>(), K1,
                          w2.defined() ? w2.const_data_ptr<float>() : nullptr, K2, N,
                          packed.data_ptr<float>());
    Entry& slot = entries_[next_];
    next_ = (next_ + 1) % entries_.size();
    slot.key = key;
    slot.packed = packed;
    return packed;
  }

 private:
  struct Ref {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl{c10::intrusive_ptr<c10::TensorImpl>()};
    const void* data = nullptr;
    uint32_t version = 0;
    bool same(const Ref& o) const {
      return impl._unsafe_get_target() == o.impl._unsafe_get_target() && data == o.data &&
             version == o.version;
    }
  };
  struct Key {
    Ref a, b;
    bool same(const Key& o) const { return a.same(o.a) && b.same(o.b); }
  };
  struct Entry {
    Key key;
    at::Tensor packed;
  };

  static bool cacheable(const at::Tensor& w) {
    return w.scalar_type() == at::kFloat && w.device().is_cpu() && w.is_contiguous() &&
           !w.is_inference();
  }
  static Ref make_ref(const at::Tensor& w) {
    Ref r;
    if (!w.defined()) return r;
    r.impl = c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr());
    r.data = w.const_data_ptr();
    r.version = w.unsafeGetTensorImpl()->version_counter().current_version();
    return r;
  }
  static Key make_key(const at::Tensor& w1, const at::Tensor& w2) {
    return {make_ref(w1), make_ref(w2)};
  }

  std::mutex mu_;
  // Two entries per GRU cell (its two GEMMs), one per LSTM or RNN cell: 32 covers deep stacks.
  std::array<Entry, 32> entries_;
  size_t next_ = 0;
};

}  // namespace ops
}  // namespace pyseqk
