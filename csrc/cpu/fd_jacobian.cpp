// CPU kernel of rkd_fast::fd_jacobian_fwd (schema in rkd_fast/ops/fd_jacobian.py).
//
// One row (sample) at a time, K small (10 to 1000); each row of s_clean, s_pert (and t_clean, t_pert) is read
// once, its loss summed and, when asked, the gradients of the reduced loss with respect to s_clean and s_pert
// written in the same pass. on="logits" works on the rows in place; on="probs" first loads each row into a
// per-task scratch buffer in the accumulation type (float; double for double inputs) to take its softmax there.
// Rows are spread over threads with at::parallel_for, in groups big enough to amortise the task cost; the inner
// loops are at::vec.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/vec_blocks.h"
#include "kernels.h"

namespace rkd_fast {
namespace {

// The inputs and outputs of the rows, and what every row needs: its step, the sample weight, 1/temperature.
template <typename scalar_t>
struct Rows {
  const scalar_t *sc, *sp, *tc, *tp;  // tc, tp null without a teacher
  int64_t sc_rs, sp_rs, tc_rs, tp_rs, k;
  const acc_t<scalar_t>* h;
  int64_t h_stride;  // 0: one step for all rows; 1: one per row
  scalar_t *gc, *gp;  // contiguous (N, K), null when not asked for
  acc_t<scalar_t> weight, inv_t;
};

// on="logits", row i: u = ((s' − s) − (t' − t)) / h, loss = Σ u², d loss / d s' = −d loss / d s = 2u/h, all in
// one walk over the row (at K = 10 a copy into scratch would cost more than the arithmetic).
template <typename scalar_t>
acc_t<scalar_t> logits_row(const Rows<scalar_t>& r, int64_t i) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const scalar_t* sc = r.sc + i * r.sc_rs;
  const scalar_t* sp = r.sp + i * r.sp_rs;
  const scalar_t* tc = r.tc ? r.tc + i * r.tc_rs : nullptr;
  const scalar_t* tp = r.tp ? r.tp + i * r.tp_rs : nullptr;
  scalar_t* gc = r.gc ? r.gc + i * r.k : nullptr;
  scalar_t* gp = r.gp ? r.gp + i * r.k : nullptr;
  const acc inv_h = acc(1) / r.h[i * r.h_stride];
  const acc g = acc(2) * r.weight * inv_h;  // d loss / d s' = g u
  const Vec vinv_h(inv_h), vg(g), vneg_g(-g);
  Vec sum0(0), sum1(0);
  int64_t j = 0;
  for (; j + kBlock <= r.k; j += kBlock) {
    Vec c0, c1, p0, p1;
    load_block(sc + j, c0, c1);
    load_block(sp + j, p0, p1);
    Vec d0 = p0 - c0, d1 = p1 - c1;
    if (tc) {
      load_block(tc + j, c0, c1);
      load_block(tp + j, p0, p1);
      d0 = d0 - (p0 - c0);
      d1 = d1 - (p1 - c1);
    }
    const Vec u0 = d0 * vinv_h, u1 = d1 * vinv_h;
    sum0 = at::vec::fmadd(u0, u0, sum0);
    sum1 = at::vec::fmadd(u1, u1, sum1);
    if (gp) store_block(gp + j, u0 * vg, u1 * vg);
    if (gc) store_block(gc + j, u0 * vneg_g, u1 * vneg_g);
  }
  acc tail = 0;
  for (; j < r.k; ++j) {
    acc d = static_cast<acc>(sp[j]) - static_cast<acc>(sc[j]);
    if (tc) d -= static_cast<acc>(tp[j]) - static_cast<acc>(tc[j]);
    const acc u = d * inv_h;
    tail += u * u;
    if (gp) gp[j] = static_cast<scalar_t>(u * g);
    if (gc) gc[j] = static_cast<scalar_t>(u * -g);
  }
  return static_cast<acc>(horizontal_sum(sum0 + sum1)) + tail;
}

// Copies a row of k inputs into buf as acc_t and pads it to kp (a multiple of the vector width) with -inf, so
// that every at::vec call below runs on whole vectors and the pads add nothing to a softmax (exp gives 0).
template <typename scalar_t, typename acc>
void load_row(const scalar_t* row, acc* buf, int64_t k, int64_t kp) {
  at::vec::convert(row, buf, k);
  std::fill(buf + k, buf + kp, -std::numeric_limits<acc>::infinity());
}

// softmax(x / T) over k elements (k a multiple of the vector width), in place, with the row max subtracted
// so exp never overflows.
template <typename acc>
void softmax_inplace(acc* x, int64_t k, acc inv_t) {
  using Vec = at::vec::Vectorized<acc>;
  if (k == 0) return;
  const acc mx = at::vec::reduce_all([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, k);
  at::vec::map([mx, inv_t](Vec v) { return ((v - Vec(mx)) * Vec(inv_t)).exp(); }, x, x, k);
  const acc inv_sum = acc(1) / at::vec::reduce_all([](Vec a, Vec b) { return a + b; }, x, k);
  at::vec::map([inv_sum](Vec v) { return v * Vec(inv_sum); }, x, x, k);
}

// on="probs", row i, with `scratch` 6·kp elements: the four rows' softmaxes, u and one gradient row.
template <typename scalar_t>
acc_t<scalar_t> probs_row(const Rows<scalar_t>& r, int64_t i, int64_t kp, acc_t<scalar_t>* scratch) {
  using acc = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  if (r.k == 0) return 0;
  acc* xc = scratch;
  acc* xp = xc + kp;
  acc* yc = xp + kp;
  acc* yp = yc + kp;
  acc* u = yp + kp;
  acc* g = u + kp;
  const bool teacher = r.tc != nullptr;
  load_row(r.sc + i * r.sc_rs, xc, r.k, kp);
  load_row(r.sp + i * r.sp_rs, xp, r.k, kp);
  softmax_inplace(xc, kp, r.inv_t);
  softmax_inplace(xp, kp, r.inv_t);
  if (teacher) {
    load_row(r.tc + i * r.tc_rs, yc, r.k, kp);
    load_row(r.tp + i * r.tp_rs, yp, r.k, kp);
    softmax_inplace(yc, kp, r.inv_t);
    softmax_inplace(yp, kp, r.inv_t);
  }

  // u = ((g(s') - g(s)) - (g(t') - g(t))) / h; loss = Σ u².
  const acc inv_h = acc(1) / r.h[i * r.h_stride];
  if (teacher) {
    at::vec::map4([inv_h](Vec a, Vec b, Vec c, Vec d) { return ((b - a) - (d - c)) * Vec(inv_h); }, u, xc, xp, yc,
                  yp, kp);
  } else {
    at::vec::map2([inv_h](Vec a, Vec b) { return (b - a) * Vec(inv_h); }, u, xc, xp, kp);
  }
  const acc loss = at::vec::map_reduce_all([](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, u, kp);
  if (!r.gc && !r.gp) return loss;

  // v = weight · d loss / d g(s') = 2 weight u/h (in place in u); d loss / d g(s) = -v. With p = softmax(x/T):
  // d loss / d x = p ⊙ (w - <p, w>) / T for an upstream gradient w.
  const acc v_scale = acc(2) * r.weight * inv_h;
  at::vec::map([v_scale](Vec v) { return v * Vec(v_scale); }, u, u, kp);
  const auto dot = [kp](const acc* a, const acc* b) {
    return at::vec::map2_reduce_all([](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, a, b,
                                    kp);
  };
  const acc inv_t = r.inv_t;
  if (r.gp) {
    const acc a = dot(xp, u);
    at::vec::map2([a, inv_t](Vec p, Vec v) { return p * (v - Vec(a)) * Vec(inv_t); }, g, xp, u, kp);
    at::vec::convert(static_cast<const acc*>(g), r.gp + i * r.k, r.k);
  }
  if (r.gc) {
    const acc a = dot(xc, u);
    at::vec::map2([a, inv_t](Vec p, Vec v) { return p * (Vec(a) - v) * Vec(inv_t); }, g, xc, u, kp);
    at::vec::convert(static_cast<const acc*>(g), r.gc + i * r.k, r.k);
  }
  return loss;
}

// losses[i] = loss_i for every row.
template <typename scalar_t>
void fd_jacobian_rows(const Rows<scalar_t>& r, int64_t n, bool probs, std::vector<acc_t<scalar_t>>& losses) {
  using Vec = AccVec<scalar_t>;
  // At least ATen's grain (32768 elements of a row tensor) per thread, as its elementwise ops: a parallel region
  // costs more than it saves below that, and on a loaded machine it waits for a core (milliseconds).
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(r.k, 1));
  const int64_t kp = (r.k + Vec::size() - 1) / Vec::size() * Vec::size();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<scalar_t>> scratch(probs ? 6 * kp : 0);
    for (int64_t i = begin; i < end; ++i) losses[i] = probs ? probs_row(r, i, kp, scratch.data()) : logits_row(r, i);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_jacobian_fwd_cpu(
    const at::Tensor& s_clean, const at::Tensor& s_pert, const at::Tensor& h,
    const std::optional<at::Tensor>& t_clean, const std::optional<at::Tensor>& t_pert, double temperature,
    int64_t options) {
  check_fd_jacobian_inputs(s_clean, s_pert, h, t_clean, t_pert, temperature, options, c10::DeviceType::CPU);
  const FdJacobianOptions opts(options);
  const bool teacher = t_clean.has_value();
  const int64_t n = s_clean.size(0);
  at::Tensor gc = opts.grad_clean ? at::empty(s_clean.sizes(), s_clean.options()) : at::empty({0}, s_clean.options());
  at::Tensor gp = opts.grad_pert ? at::empty(s_pert.sizes(), s_pert.options()) : at::empty({0}, s_pert.options());
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_clean.scalar_type(), "fd_jacobian_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const double weight = sample_weight(opts.reduction, n);
    const Rows<scalar_t> rows{s_clean.const_data_ptr<scalar_t>(),
                              s_pert.const_data_ptr<scalar_t>(),
                              teacher ? t_clean->const_data_ptr<scalar_t>() : nullptr,
                              teacher ? t_pert->const_data_ptr<scalar_t>() : nullptr,
                              s_clean.stride(0),
                              s_pert.stride(0),
                              teacher ? t_clean->stride(0) : 0,
                              teacher ? t_pert->stride(0) : 0,
                              s_clean.size(1),
                              h.const_data_ptr<acc>(),
                              h.dim() == 0 ? 0 : 1,
                              opts.grad_clean ? gc.mutable_data_ptr<scalar_t>() : nullptr,
                              opts.grad_pert ? gp.mutable_data_ptr<scalar_t>() : nullptr,
                              static_cast<acc>(weight),
                              static_cast<acc>(1.0 / temperature)};
    std::vector<acc> losses(n);
    fd_jacobian_rows(rows, n, opts.probs, losses);
    double total = 0;
    for (acc v : losses) total += v;
    if (opts.reduction == kReduceNone) {
      loss = at::empty({n}, h.options());
      std::copy(losses.begin(), losses.end(), loss.mutable_data_ptr<acc>());
    } else {  // the mean of no rows is 0/0 = NaN, as torch.mean
      loss = at::scalar_tensor(opts.reduction == kReduceSum ? total : total / static_cast<double>(n), h.options());
    }
  });
  return {loss, gc, gp};
}

TORCH_LIBRARY_IMPL(rkd_fast, CPU, m) {
  m.impl("fd_jacobian_fwd", &fd_jacobian_fwd_cpu);
}

}  // namespace rkd_fast
