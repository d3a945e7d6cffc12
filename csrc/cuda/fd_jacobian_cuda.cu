// CUDA kernel of rkd_fast::fd_jacobian_fwd (schema in rkd_fast/ops/fd_jacobian.py; CPU twin in
// csrc/cpu/fd_jacobian.cpp).
//
// One warp per row (sample): K is small (10 to 1000), so each lane handles at most a few dozen elements and
// the row reductions are warp shuffles, with no shared memory and no block-wide barriers. Math in fp32 (fp64
// for fp64 inputs). With on="probs" the warp first finds each row's max and softmax normaliser (the max
// subtracted, so exp never overflows); then one pass sums the loss (and the two dot products the softmax
// gradient needs) and, when a gradient is asked for, a last pass writes it. Re-reads of a row hit L1/L2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "kernels.h"

namespace rkd_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // 4 warps (128 threads) per block, one row each

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Softmax statistics of one row: its max and 1 / Σ exp((x - max) / T).
template <typename scalar_t, typename acc_t>
__device__ void softmax_stats(const scalar_t* x, int64_t k, acc_t inv_t, int lane, acc_t& row_max,
                              acc_t& inv_sum) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = lane; j < k; j += kWarp) {
    const acc_t v = static_cast<acc_t>(x[j]);
    m = v > m ? v : m;
  }
  m = warp_max(m);
  acc_t s = 0;
  for (int64_t j = lane; j < k; j += kWarp) s += exp((static_cast<acc_t>(x[j]) - m) * inv_t);
  row_max = m;
  inv_sum = acc_t(1) / warp_sum(s);
}

template <typename scalar_t, typename acc_t, bool PROBS>
__device__ __forceinline__ acc_t g(const scalar_t* x, int64_t j, acc_t row_max, acc_t inv_sum, acc_t inv_t) {
  const acc_t v = static_cast<acc_t>(x[j]);
  if constexpr (PROBS) {
    return exp((v - row_max) * inv_t) * inv_sum;
  } else {
    return v;
  }
}

template <typename scalar_t, bool PROBS, bool TEACHER>
__global__ void fd_jacobian_rows(const scalar_t* __restrict__ sc, const scalar_t* __restrict__ sp,
                                 const scalar_t* __restrict__ tc, const scalar_t* __restrict__ tp, int64_t sc_rs,
                                 int64_t sp_rs, int64_t tc_rs, int64_t tp_rs,
                                 const at::opmath_type<scalar_t>* __restrict__ h, int64_t h_stride,
                                 at::opmath_type<scalar_t>* __restrict__ losses, scalar_t* __restrict__ grad_c,
                                 scalar_t* __restrict__ grad_p, int64_t n, int64_t k,
                                 at::opmath_type<scalar_t> inv_t, at::opmath_type<scalar_t> weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;  // the whole warp leaves together, so the shuffles below stay full-warp
  sc += row * sc_rs;
  sp += row * sp_rs;
  if constexpr (TEACHER) {
    tc += row * tc_rs;
    tp += row * tp_rs;
  }
  const acc_t inv_h = acc_t(1) / h[row * h_stride];  // h_stride 0: one step for every row

  acc_t m_sc = 0, z_sc = 1, m_sp = 0, z_sp = 1, m_tc = 0, z_tc = 1, m_tp = 0, z_tp = 1;
  if constexpr (PROBS) {
    softmax_stats(sc, k, inv_t, lane, m_sc, z_sc);
    softmax_stats(sp, k, inv_t, lane, m_sp, z_sp);
    if constexpr (TEACHER) {
      softmax_stats(tc, k, inv_t, lane, m_tc, z_tc);
      softmax_stats(tp, k, inv_t, lane, m_tp, z_tp);
    }
  }

  // u = ((g(s') - g(s)) - (g(t') - g(t))) / h, loss = Σ u², v = d loss / d g(s') = 2u/h.
  acc_t loss = 0, dot_c = 0, dot_p = 0;
  for (int64_t j = lane; j < k; j += kWarp) {
    const acc_t gc = g<scalar_t, acc_t, PROBS>(sc, j, m_sc, z_sc, inv_t);
    const acc_t gp = g<scalar_t, acc_t, PROBS>(sp, j, m_sp, z_sp, inv_t);
    acc_t diff = gp - gc;
    if constexpr (TEACHER) {
      diff -= g<scalar_t, acc_t, PROBS>(tp, j, m_tp, z_tp, inv_t) - g<scalar_t, acc_t, PROBS>(tc, j, m_tc, z_tc, inv_t);
    }
    const acc_t u = diff * inv_h;
    loss += u * u;
    const acc_t v = 2 * weight * inv_h * u;  // weight: the row's weight in the reduced loss
    if constexpr (PROBS) {
      dot_c += gc * v;
      dot_p += gp * v;
    } else {  // identity g: d loss / d s' = v, d loss / d s = -v
      if (grad_p) grad_p[row * k + j] = static_cast<scalar_t>(v);
      if (grad_c) grad_c[row * k + j] = static_cast<scalar_t>(-v);
    }
  }
  loss = warp_sum(loss);
  if (lane == 0) losses[row] = loss;

  if constexpr (PROBS) {
    if (grad_c == nullptr && grad_p == nullptr) return;
    // Softmax g with p = softmax(x/T): d loss / d x = p ⊙ (w - <p, w>) / T for an upstream gradient w.
    const acc_t a_c = warp_sum(dot_c), a_p = warp_sum(dot_p);
    for (int64_t j = lane; j < k; j += kWarp) {
      const acc_t gc = g<scalar_t, acc_t, PROBS>(sc, j, m_sc, z_sc, inv_t);
      const acc_t gp = g<scalar_t, acc_t, PROBS>(sp, j, m_sp, z_sp, inv_t);
      acc_t diff = gp - gc;
      if constexpr (TEACHER) {
        diff -= g<scalar_t, acc_t, PROBS>(tp, j, m_tp, z_tp, inv_t) -
                g<scalar_t, acc_t, PROBS>(tc, j, m_tc, z_tc, inv_t);
      }
      const acc_t v = 2 * weight * inv_h * (diff * inv_h);
      if (grad_p) grad_p[row * k + j] = static_cast<scalar_t>(gp * (v - a_p) * inv_t);
      if (grad_c) grad_c[row * k + j] = static_cast<scalar_t>(gc * (a_c - v) * inv_t);
    }
  }
}

template <typename scalar_t, bool PROBS, bool TEACHER>
void launch(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor* t_clean,
            const at::Tensor* t_pert, const at::Tensor& h, at::Tensor& losses, scalar_t* grad_c, scalar_t* grad_p,
            double temperature, double weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = s_clean.size(0), k = s_clean.size(1);
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  const scalar_t* tc = TEACHER ? t_clean->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* tp = TEACHER ? t_pert->const_data_ptr<scalar_t>() : nullptr;
  fd_jacobian_rows<scalar_t, PROBS, TEACHER>
      <<<static_cast<unsigned int>(blocks), kRowsPerBlock * kWarp, 0, c10::cuda::getCurrentCUDAStream()>>>(
          s_clean.const_data_ptr<scalar_t>(), s_pert.const_data_ptr<scalar_t>(), tc, tp, s_clean.stride(0),
          s_pert.stride(0), TEACHER ? t_clean->stride(0) : 0, TEACHER ? t_pert->stride(0) : 0,
          h.const_data_ptr<acc_t>(), h.dim() == 0 ? 0 : 1, losses.data_ptr<acc_t>(), grad_c, grad_p, n, k,
          static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cuda(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, double temperature,
    int64_t options) {
  check_fd_jacobian_inputs(s_clean, s_pert, h, t_clean, t_pert, temperature, options, c10::DeviceType::CUDA);
  const FdJacobianOptions opts(options);
  const bool teacher = t_clean.has_value();
  const auto acc = accumulate_dtype(s_clean);
  const int64_t n = s_clean.size(0);

  const c10::cuda::CUDAGuard guard(s_clean.device());
  at::Tensor losses = at::empty({n}, s_clean.options().dtype(acc));
  at::Tensor gc = opts.grad_clean ? at::empty(s_clean.sizes(), s_clean.options()) : at::empty({0}, s_clean.options());
  at::Tensor gp = opts.grad_pert ? at::empty(s_pert.sizes(), s_pert.options()) : at::empty({0}, s_pert.options());
  if (n > 0) {
    const at::Tensor* tc = teacher ? &*t_clean : nullptr;
    const at::Tensor* tp = teacher ? &*t_pert : nullptr;
    const double weight = sample_weight(opts.reduction, n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_clean.scalar_type(), "fd_jacobian_fwd_cuda", [&] {
      scalar_t* gc_ptr = opts.grad_clean ? gc.data_ptr<scalar_t>() : nullptr;
      scalar_t* gp_ptr = opts.grad_pert ? gp.data_ptr<scalar_t>() : nullptr;
      if (opts.probs) {
        if (teacher) {
          launch<scalar_t, true, true>(s_clean, s_pert, tc, tp, h, losses, gc_ptr, gp_ptr, temperature, weight);
        } else {
          launch<scalar_t, true, false>(s_clean, s_pert, tc, tp, h, losses, gc_ptr, gp_ptr, temperature, weight);
        }
      } else {
        if (teacher) {
          launch<scalar_t, false, true>(s_clean, s_pert, tc, tp, h, losses, gc_ptr, gp_ptr, temperature, weight);
        } else {
          launch<scalar_t, false, false>(s_clean, s_pert, tc, tp, h, losses, gc_ptr, gp_ptr, temperature, weight);
        }
      }
    });
  }
  if (opts.reduction == kReduceNone) return {losses, gc, gp};
  return {opts.reduction == kReduceMean ? losses.mean() : losses.sum(), gc, gp};  // the mean of none is NaN
}

TORCH_LIBRARY_IMPL(rkd_fast, CUDA, m) {
  m.impl("fd_jacobian_fwd", &fd_jacobian_fwd_cuda);
}

}  // namespace rkd_fast
