// CPU kernel of rkd_fast::fd_jacobian_fwd (schema in rkd_fast/ops/fd_jacobian.py).
//
// One row (sample) at a time, K small (10 to 1000): each row of s_clean, s_pert (and t_clean, t_pert) is
// loaded once into a per-task scratch buffer in the accumulation type (float; double for double inputs),
// the loss is summed there and, when asked, the per-sample gradients d loss_i / d s_clean_i and
// d loss_i / d s_pert_i are written in the same pass. Rows are spread over threads with at::parallel_for,
// in groups big enough to amortise the task cost; the inner loops are at::vec.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace rkd_fast {
namespace {

using at::vec::Vectorized;

// Copies a row of k inputs into buf as acc_t and pads it to kp (a multiple of the vector width) with `pad`,
// so that every at::vec call below runs on whole vectors: for K of a few dozen, the partial-vector tails
// would otherwise cost more than the arithmetic. Pads are chosen to add nothing: 0 for logits, -inf before
// a softmax (exp gives 0).
template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* row, acc_t* buf, int64_t k, int64_t kp, acc_t pad) {
  at::vec::convert(row, buf, k);
  std::fill(buf + k, buf + kp, pad);
}

// softmax(x / T) over k elements (k a multiple of the vector width), in place, with the row max subtracted
// so exp never overflows.
template <typename acc_t>
void softmax_inplace(acc_t* x, int64_t k, acc_t inv_t) {
  using Vec = Vectorized<acc_t>;
  if (k == 0) return;
  const acc_t mx = at::vec::reduce_all([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, k);
  at::vec::map([mx, inv_t](Vec v) { return ((v - Vec(mx)) * Vec(inv_t)).exp(); }, x, x, k);
  const acc_t inv_sum = acc_t(1) / at::vec::reduce_all([](Vec a, Vec b) { return a + b; }, x, k);
  at::vec::map([inv_sum](Vec v) { return v * Vec(inv_sum); }, x, x, k);
}

template <typename scalar_t>
void fd_jacobian_rows(const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
                      const at::Tensor* t_clean, const at::Tensor* t_pert, bool probs, double temperature,
                      at::Tensor& losses, at::Tensor* grad_clean, at::Tensor* grad_pert) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t n = s_clean.size(0), k = s_clean.size(1);
  const bool teacher = t_clean != nullptr;
  const bool need_grad = grad_clean != nullptr || grad_pert != nullptr;
  const acc_t inv_t = acc_t(1.0 / temperature);

  const scalar_t* sc = s_clean.const_data_ptr<scalar_t>();
  const scalar_t* sp = s_pert.const_data_ptr<scalar_t>();
  const scalar_t* tc = teacher ? t_clean->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* tp = teacher ? t_pert->const_data_ptr<scalar_t>() : nullptr;
  const int64_t sc_rs = s_clean.stride(0), sp_rs = s_pert.stride(0);
  const int64_t tc_rs = teacher ? t_clean->stride(0) : 0, tp_rs = teacher ? t_pert->stride(0) : 0;
  const acc_t* hs = h.const_data_ptr<acc_t>();
  acc_t* out = losses.data_ptr<acc_t>();
  scalar_t* gc = grad_clean ? grad_clean->data_ptr<scalar_t>() : nullptr;  // contiguous (N, K)
  scalar_t* gp = grad_pert ? grad_pert->data_ptr<scalar_t>() : nullptr;

  // About 16K elements per task: one task for the small batches, several for (1024, 1000).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
  const int64_t kp = (k + Vec::size() - 1) / Vec::size() * Vec::size();
  const acc_t pad = probs ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // Scratch rows: student clean/pert, teacher clean/pert, the scaled difference u, one gradient row.
    std::vector<acc_t> scratch(6 * std::max<int64_t>(kp, 1));
    acc_t* xc = scratch.data();
    acc_t* xp = xc + kp;
    acc_t* yc = xp + kp;
    acc_t* yp = yc + kp;
    acc_t* u = yp + kp;
    acc_t* g = u + kp;

    for (int64_t i = begin; i < end; ++i) {
      load_row(sc + i * sc_rs, xc, k, kp, pad);
      load_row(sp + i * sp_rs, xp, k, kp, pad);
      if (teacher) {
        load_row(tc + i * tc_rs, yc, k, kp, pad);
        load_row(tp + i * tp_rs, yp, k, kp, pad);
      }
      if (probs) {
        softmax_inplace(xc, kp, inv_t);
        softmax_inplace(xp, kp, inv_t);
        if (teacher) {
          softmax_inplace(yc, kp, inv_t);
          softmax_inplace(yp, kp, inv_t);
        }
      }

      // u = ((g(s') - g(s)) - (g(t') - g(t))) / h; loss = Σ u².
      const acc_t inv_h = acc_t(1) / hs[i];
      if (teacher) {
        at::vec::map4([inv_h](Vec a, Vec b, Vec c, Vec d) { return ((b - a) - (d - c)) * Vec(inv_h); }, u, xc,
                      xp, yc, yp, kp);
      } else {
        at::vec::map2([inv_h](Vec a, Vec b) { return (b - a) * Vec(inv_h); }, u, xc, xp, kp);
      }
      out[i] = k == 0 ? acc_t(0)
                      : at::vec::map_reduce_all([](Vec v) { return v * v; },
                                                [](Vec a, Vec b) { return a + b; }, u, kp);
      if (!need_grad || k == 0) continue;

      // v = d loss / d g(s') = 2u/h (in place in u); d loss / d g(s) = -v.
      at::vec::map([inv_h](Vec v) { return v * Vec(2 * inv_h); }, u, u, kp);
      if (!probs) {
        // Identity g: d loss / d s' = v and d loss / d s = -v.
        if (gp) at::vec::convert(u, gp + i * k, k);
        if (gc) {
          at::vec::map([](Vec v) { return Vec(0) - v; }, g, u, kp);
          at::vec::convert(static_cast<const acc_t*>(g), gc + i * k, k);
        }
        continue;
      }
      // Softmax g with p = softmax(x/T): d loss / d x = p ⊙ (w - <p, w>) / T for an upstream gradient w.
      const auto dot = [kp](const acc_t* a, const acc_t* b) {
        return at::vec::map2_reduce_all([](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; },
                                        a, b, kp);
      };
      if (gp) {
        const acc_t a = dot(xp, u);
        at::vec::map2([a, inv_t](Vec p, Vec v) { return p * (v - Vec(a)) * Vec(inv_t); }, g, xp, u, kp);
        at::vec::convert(static_cast<const acc_t*>(g), gp + i * k, k);
      }
      if (gc) {
        const acc_t a = dot(xc, u);
        at::vec::map2([a, inv_t](Vec p, Vec v) { return p * (Vec(a) - v) * Vec(inv_t); }, g, xc, u, kp);
        at::vec::convert(static_cast<const acc_t*>(g), gc + i * k, k);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cpu(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, int64_t on,
    double temperature, bool grad_clean, bool grad_pert) {
  check_fd_jacobian_inputs(s_clean, s_pert, h, t_clean, t_pert, on, temperature, c10::DeviceType::CPU);
  const bool teacher = t_clean.has_value();
  const auto acc = accumulate_dtype(s_clean);
  const int64_t n = s_clean.size(0);

  at::Tensor losses = at::empty({n}, s_clean.options().dtype(acc));
  at::Tensor gc = grad_clean ? at::empty(s_clean.sizes(), s_clean.options()) : at::empty({0}, s_clean.options());
  at::Tensor gp = grad_pert ? at::empty(s_pert.sizes(), s_pert.options()) : at::empty({0}, s_pert.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_clean.scalar_type(), "fd_jacobian_fwd_cpu", [&] {
    fd_jacobian_rows<scalar_t>(s_clean, s_pert, h, teacher ? &*t_clean : nullptr, teacher ? &*t_pert : nullptr,
                               on == 1, temperature, losses, grad_clean ? &gc : nullptr,
                               grad_pert ? &gp : nullptr);
  });
  return {losses, gc, gp};
}

TORCH_LIBRARY_IMPL(rkd_fast, CPU, m) {
  m.impl("fd_jacobian_fwd", &fd_jacobian_fwd_cpu);
}

}  // namespace rkd_fast
