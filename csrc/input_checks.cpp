// Input checks shared by the CPU and CUDA kernels (declared in kernels.h). One definition, compiled by the C++
// compiler, so that both devices refuse the same inputs with the same messages.
#include <ATen/ATen.h>

#include <optional>

#include "kernels.h"

namespace rkd_fast {
namespace {

void check_rows(const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.device() == ref.device(), "fd_jacobian_fwd: ", name, " must be on ", ref.device(), ", got ",
              x.device());
  TORCH_CHECK(x.dim() == 2 && x.sizes() == ref.sizes(), "fd_jacobian_fwd: ", name, " must have shape ",
              ref.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "fd_jacobian_fwd: ", name, " must have dtype ",
              ref.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fd_jacobian_fwd: ", name, " rows must be unit-stride");
}

}  // namespace

void check_fd_jacobian_inputs(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
                              const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert,
                              int64_t on, double temperature, c10::DeviceType device_type) {
  TORCH_CHECK(s_clean.device().type() == device_type, "fd_jacobian_fwd (", c10::DeviceTypeName(device_type),
              "): s_clean must be a ", c10::DeviceTypeName(device_type), " tensor, got one on ", s_clean.device());
  TORCH_CHECK(s_clean.dim() == 2, "fd_jacobian_fwd: s_clean must be 2-D (N, K), got ", s_clean.sizes());
  TORCH_CHECK(at::isFloatingType(s_clean.scalar_type()), "fd_jacobian_fwd: inputs must be floating point");
  check_rows("s_clean", s_clean, s_clean);
  check_rows("s_pert", s_pert, s_clean);
  TORCH_CHECK(t_clean.has_value() == t_pert.has_value(),
              "fd_jacobian_fwd: give both t_clean and t_pert or neither");
  if (t_clean.has_value()) {
    check_rows("t_clean", *t_clean, s_clean);
    check_rows("t_pert", *t_pert, s_clean);
  }
  TORCH_CHECK(on == 0 || on == 1, "fd_jacobian_fwd: on must be 0 (logits) or 1 (probs), got ", on);
  TORCH_CHECK(temperature > 0, "fd_jacobian_fwd: temperature must be > 0, got ", temperature);
  const auto acc = s_clean.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = s_clean.size(0);
  TORCH_CHECK(h.device() == s_clean.device() && h.dim() == 1 && h.size(0) == n && h.is_contiguous() &&
                  h.scalar_type() == acc,
              "fd_jacobian_fwd: h must be a contiguous tensor of shape (", n, ",) and dtype ", acc, " on ",
              s_clean.device());
}

}  // namespace rkd_fast
