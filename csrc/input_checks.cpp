// Input checks shared by the CPU and CUDA kernels (declared in kernels.h). One definition, compiled by the C++
// compiler, so that both devices refuse the same inputs with the same messages and exception types: TypeError for
// a dtype, ValueError for the rest (the Python wrappers' and the Triton kernels' types).
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "kernels.h"

namespace rkd_fast {
namespace {

void check_device(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(x.device().type() == device_type, op, " (", c10::DeviceTypeName(device_type), "): expected ",
                    c10::DeviceTypeName(device_type), " tensors, got one on ", x.device());
}

bool same_flat_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  return a.dim() == 4 && a.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         b.is_contiguous(at::MemoryFormat::ChannelsLast);
}

bool in_place_layout(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_rows(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), "fd_jacobian_fwd: ", name, " must be on ", ref.device(), ", got ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.sizes() == ref.sizes(), "fd_jacobian_fwd: ", name, " must have shape ",
                    ref.sizes(), ", got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), "fd_jacobian_fwd: ", name, " must have dtype ",
                   ref.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "fd_jacobian_fwd: ", name, " rows must be unit-stride");
}

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction == kReduceMean || reduction == kReduceSum || reduction == kReduceNone, op,
                    ": reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
}

}  // namespace

void check_feature_distance_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, int64_t mode,
                                   double p, int64_t reduction, c10::DeviceType device_type) {
  check_device(op, student, device_type);
  TORCH_CHECK_VALUE(student.device() == teacher.device(), op, ": student and teacher are on ", student.device(),
                    " and ", teacher.device());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   op, ": unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)");
  TORCH_CHECK_TYPE(teacher.scalar_type() == dtype, op, ": student and teacher dtypes differ: ", dtype, " and ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(mode == kMse || mode == kNormalized || mode == kAttention, op,
                    ": mode must be 0 (mse), 1 (normalized) or 2 (attention), got ", mode);
  check_reduction(op, reduction);
  TORCH_CHECK_VALUE(student.dim() >= 1 && teacher.dim() >= 1 && student.size(0) == teacher.size(0), op,
                    ": student and teacher need the same batch size in dim 0, got shapes ", student.sizes(), " and ",
                    teacher.sizes());
  if (mode == kAttention) {
    TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4 && student.size(2) == teacher.size(2) &&
                          student.size(3) == teacher.size(3),
                      op, ": mode 2 (attention) takes 4-D (N, C, H, W) maps with equal H, W, got ", student.sizes(),
                      " and ", teacher.sizes());
    TORCH_CHECK_VALUE(in_place_layout(student) && in_place_layout(teacher), op,
                      ": mode 2 (attention) reads contiguous or channels_last tensors, got strides ",
                      student.strides(), " and ", teacher.strides());
    TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, op, ": p must be a finite number > 0, got ", p);
  } else {
    TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), op, ": modes 0 and 1 need equal shapes, got ",
                      student.sizes(), " and ", teacher.sizes());
    TORCH_CHECK_VALUE(same_flat_order(student, teacher), op,
                      ": modes 0 and 1 need student and teacher both contiguous or both channels_last, got "
                      "strides ", student.strides(), " and ", teacher.strides());
  }
}

void check_fd_jacobian_inputs(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
                              const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert,
                              double temperature, int64_t options, c10::DeviceType device_type) {
  check_device("fd_jacobian_fwd", s_clean, device_type);
  TORCH_CHECK_VALUE(s_clean.dim() == 2, "fd_jacobian_fwd: s_clean must be 2-D (N, K), got ", s_clean.sizes());
  const auto dtype = s_clean.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "fd_jacobian_fwd: unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)");
  check_rows("s_clean", s_clean, s_clean);
  check_rows("s_pert", s_pert, s_clean);
  TORCH_CHECK_VALUE(t_clean.has_value() == t_pert.has_value(),
                    "fd_jacobian_fwd: give both t_clean and t_pert or neither");
  if (t_clean.has_value()) {
    check_rows("t_clean", *t_clean, s_clean);
    check_rows("t_pert", *t_pert, s_clean);
  }
  TORCH_CHECK_VALUE(options >= 0 && options < 32, "fd_jacobian_fwd: options must be an int of 5 bits, got ",
                    options);
  check_reduction("fd_jacobian_fwd", FdJacobianOptions(options).reduction);
  TORCH_CHECK_VALUE(temperature > 0, "fd_jacobian_fwd: temperature must be > 0, got ", temperature);
  const auto acc = accumulate_dtype(s_clean);
  const int64_t n = s_clean.size(0);
  TORCH_CHECK_VALUE(h.device() == s_clean.device() && (h.dim() == 0 || (h.dim() == 1 && h.size(0) == n)) &&
                        h.is_contiguous() && h.scalar_type() == acc,
                    "fd_jacobian_fwd: h must be a contiguous tensor of shape () or (", n, ",) and dtype ", acc,
                    " on ", s_clean.device());
}

}  // namespace rkd_fast
