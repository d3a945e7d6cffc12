// Entry points of the C++ kernels, in namespace rkd_fast. Each is registered with the dispatcher in its own
// source file (TORCH_LIBRARY_IMPL for a schema defined in Python, rkd_fast/ops); they are declared here so
// that C++ code (csrc/tests/test_kernels.cpp) can call them directly, without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace rkd_fast {

// ---- feature_distance (csrc/cpu/feature_distance.cpp) ----
// rkd_fast::feature_distance_fwd(student, teacher, mode, p, grad_student, grad_teacher)
//   -> (losses (N,) float32 or float64, d loss_i / d student_i, d loss_i / d teacher_i).
// mode: 0 "mse", 1 "normalized", 2 "attention" (see rkd_fast/ops/feature_distance.py). A gradient that is not
// asked for comes back as an empty tensor of shape (0,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cpu(const at::Tensor& student,
                                                                        const at::Tensor& teacher, int64_t mode,
                                                                        double p, bool grad_student,
                                                                        bool grad_teacher);
#ifdef RKD_FAST_WITH_CUDA
// The same op on CUDA tensors (csrc/cuda/feature_distance_cuda.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                         const at::Tensor& teacher, int64_t mode,
                                                                         double p, bool grad_student,
                                                                         bool grad_teacher);
#endif

// ---- fd_jacobian (csrc/cpu/fd_jacobian.cpp, csrc/cuda/fd_jacobian_cuda.cu) ----
// rkd_fast::fd_jacobian_fwd(s_clean, s_pert, h, t_clean, t_pert, on, temperature, grad_clean, grad_pert)
//   -> (losses (N,) float32 or float64, d loss_i / d s_clean_i, d loss_i / d s_pert_i).
// Inputs (N, K) of one dtype with unit-stride rows; h: (N,) contiguous, float32 (float64 for float64 inputs);
// t_clean, t_pert both given or both absent; on: 0 "logits", 1 "probs" (softmax(x / temperature)). A gradient
// that is not asked for comes back as an empty tensor of shape (0,). See rkd_fast/ops/fd_jacobian.py.
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
