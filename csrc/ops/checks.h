// Argument checks shared by every op entry: each message names the argument and says what was
// expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "pyseqk/dtype.h"

namespace pyseqk {
namespace ops {

// The dtype as Python users spell it (torch.float32), so messages match the Python backends'.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "pyseqk: ", name, " must be float32, float64, float16 or bfloat16, got ",
                       py_dtype(t.scalar_type()));
  }
  return DType::kFloat32;
}

// Every tensor on `ref`'s device and of its dtype.
inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "pyseqk: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; expected all tensors on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "pyseqk: ", name, " has dtype ",
                   py_dtype(t.scalar_type()), " but ", ref_name, " has dtype ",
                   py_dtype(ref.scalar_type()),
                   "; expected one dtype");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "pyseqk: ", name, " must be ", dim, "-D ", shape, ", got shape ",
              t.sizes());
}

inline const void* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

}  // namespace ops
}  // namespace pyseqk
