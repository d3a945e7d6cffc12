// Entry points of the C++ kernels, in namespace rkd_fast. Each is registered with the dispatcher in its own
// source file (TORCH_LIBRARY_IMPL for a schema defined in Python, rkd_fast/ops); they are declared here so
// that C++ code (csrc/tests/test_kernels.cpp) can call them directly, without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace rkd_fast {

// Both ops accumulate (and return losses and saved statistics) in float32, or float64 for float64 inputs.
inline at::ScalarType accumulate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- feature_distance (csrc/cpu/feature_distance.cpp) ----
// rkd_fast::feature_distance_fwd(student, teacher, mode, p) -> (losses, coeffs, map_s, map_t)
//   losses (N,) and coeffs (N, 4) in float32 (float64 for float64 inputs); d loss_i / d s_i = c0 s_i + c1 t_i
//   and d loss_i / d t_i = c2 s_i + c3 t_i (in mode attention: d loss_i / d a_s and / d a_t of the maps).
//   map_s, map_t: mode attention's unnormalised maps (N, H*W); empty (0,) tensors in the other modes.
// rkd_fast::feature_distance_bwd(grad_losses, student, teacher, coeffs, map_s, map_t, mode, p, grad_student,
//                                grad_teacher) -> (grad_student, grad_teacher)
//   grad_losses[i] * d loss_i / d input_i in the inputs' dtype and layout; one not asked for comes back as an
//   empty tensor of shape (0,).
// mode: 0 "mse", 1 "normalized", 2 "attention" (see rkd_fast/ops/feature_distance.py).
enum FeatureDistanceMode : int64_t { kMse = 0, kNormalized = 1, kAttention = 2 };
// The checks both kernels make first (csrc/input_checks.cpp), so that both refuse the same inputs with the same
// ValueError / TypeError: (student, teacher, mode, p) for `op` on a `device_type` device; and the backward's
// saved inputs, which must be what the forward returned for (student, teacher, mode).
void check_feature_distance_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, int64_t mode,
                                   double p, c10::DeviceType device_type);
void check_feature_distance_saved(const at::Tensor& grad_losses, const at::Tensor& coeffs, const at::Tensor& map_s,
                                  const at::Tensor& map_t, const at::Tensor& student, int64_t mode);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cpu(const at::Tensor& student,
                                                                                    const at::Tensor& teacher,
                                                                                    int64_t mode, double p);
std::tuple<at::Tensor, at::Tensor> feature_distance_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& coeffs,
                                                            const at::Tensor& map_s, const at::Tensor& map_t,
                                                            int64_t mode, double p, bool grad_student,
                                                            bool grad_teacher);
#ifdef RKD_FAST_WITH_CUDA
// The same ops on CUDA tensors (csrc/cuda/feature_distance_cuda.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                                     const at::Tensor& teacher,
                                                                                     int64_t mode, double p);
std::tuple<at::Tensor, at::Tensor> feature_distance_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student,
                                                             const at::Tensor& teacher, const at::Tensor& coeffs,
                                                             const at::Tensor& map_s, const at::Tensor& map_t,
                                                             int64_t mode, double p, bool grad_student,
                                                             bool grad_teacher);
#endif

// ---- fd_jacobian (csrc/cpu/fd_jacobian.cpp, csrc/cuda/fd_jacobian_cuda.cu) ----
// rkd_fast::fd_jacobian_fwd(s_clean, s_pert, h, t_clean, t_pert, on, temperature, grad_clean, grad_pert)
//   -> (losses (N,) float32 or float64, d loss_i / d s_clean_i, d loss_i / d s_pert_i).
// Inputs (N, K) of one dtype with unit-stride rows; h: (N,) contiguous, float32 (float64 for float64 inputs);
// t_clean, t_pert both given or both absent; on: 0 "logits", 1 "probs" (softmax(x / temperature)). A gradient
// that is not asked for comes back as an empty tensor of shape (0,). See rkd_fast/ops/fd_jacobian.py.
// The checks both kernels make on those inputs first (csrc/input_checks.cpp): s_clean on a `device_type`
// device, every other tensor on the same device, the shapes, dtypes, strides and arguments above.
void check_fd_jacobian_inputs(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
                              const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert,
                              int64_t on, double temperature, c10::DeviceType device_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cpu(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, int64_t on,
    double temperature, bool grad_clean, bool grad_pert);
#ifdef RKD_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cuda(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, int64_t on,
    double temperature, bool grad_clean, bool grad_pert);
#endif

}  // namespace rkd_fast
