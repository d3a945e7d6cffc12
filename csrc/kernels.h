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

// How both ops reduce their per-sample losses (the index in rkd_fast/ops/_dispatch.py's REDUCTIONS).
enum Reduction : int64_t { kReduceMean = 0, kReduceSum = 1, kReduceNone = 2 };
// The weight of each sample's loss in the reduced loss, and so of its gradient: 1/N for the mean, 1 otherwise.
inline double sample_weight(int64_t reduction, int64_t n) {
  return reduction == kReduceMean && n > 0 ? 1.0 / static_cast<double>(n) : 1.0;
}

// ---- feature_distance (csrc/cpu/feature_distance.cpp, csrc/cuda/feature_distance_cuda.cu) ----
// rkd_fast::feature_distance_fwd(student, teacher, mode, p, reduction, grad_student, grad_teacher)
//   -> (loss, grad_student, grad_teacher)
//   loss: the per-sample losses reduced as `reduction` says ((N,) for none, 0-d for mean and sum), in float32
//   (float64 for float64 inputs). grad_student, grad_teacher: d loss / d input for an upstream gradient of one,
//   in the input's dtype and strides, computed in the same pass as the loss; one whose flag is off comes back
//   as an empty tensor of shape (0,).
// mode: 0 "mse", 1 "normalized", 2 "attention" (see rkd_fast/ops/feature_distance.py).
enum FeatureDistanceMode : int64_t { kMse = 0, kNormalized = 1, kAttention = 2 };
// The checks both kernels make first (csrc/input_checks.cpp), so that both refuse the same inputs with the same
// ValueError / TypeError: (student, teacher, mode, p, reduction) for `op` on a `device_type` device.
void check_feature_distance_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher, int64_t mode,
                                   double p, int64_t reduction, c10::DeviceType device_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cpu(const at::Tensor& student,
                                                                       const at::Tensor& teacher, int64_t mode,
                                                                       double p, int64_t reduction, bool grad_student,
                                                                       bool grad_teacher);
#ifdef RKD_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                        const at::Tensor& teacher, int64_t mode,
                                                                        double p, int64_t reduction, bool grad_student,
                                                                        bool grad_teacher);
#endif

// ---- fd_jacobian (csrc/cpu/fd_jacobian.cpp, csrc/cuda/fd_jacobian_cuda.cu) ----
// rkd_fast::fd_jacobian_fwd(s_clean, s_pert, h, t_clean, t_pert, temperature, options)
//   -> (loss, grad_clean, grad_pert): the per-sample losses reduced as asked ((N,) for none, 0-d otherwise) in
//   float32 (float64 for float64 inputs), and d loss / d s_clean, d s_pert for an upstream gradient of one (each
//   only when asked, else an empty tensor of shape (0,)).
// Inputs (N, K) of one dtype with unit-stride rows; h: 0-d (one step) or (N,) contiguous, float32 (float64 for
// float64 inputs); t_clean, t_pert both given or both absent. options packs the rest into one int (see
// rkd_fast/ops/fd_jacobian.py for why): bit 0 on (0 "logits", 1 "probs": softmax(x / temperature)), bits 1-2 the
// reduction, bits 3 and 4 whether to compute grad_clean and grad_pert.
struct FdJacobianOptions {
  bool probs;
  int64_t reduction;
  bool grad_clean, grad_pert;
  explicit FdJacobianOptions(int64_t options)
      : probs(options & 1), reduction((options >> 1) & 3), grad_clean(options & 8), grad_pert(options & 16) {}
};
// The checks both kernels make on those inputs first (csrc/input_checks.cpp): s_clean on a `device_type`
// device, every other tensor on the same device, the shapes, dtypes, strides and arguments above.
void check_fd_jacobian_inputs(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
                              const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert,
                              double temperature, int64_t options, c10::DeviceType device_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cpu(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, double temperature,
    int64_t options);
#ifdef RKD_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cuda(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, double temperature,
    int64_t options);
#endif

}  // namespace rkd_fast
