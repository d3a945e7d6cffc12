// C++ test of the CPU kernels, called directly (not through the dispatcher: the op schemas are defined in
// Python). Each result (the losses and the gradients the forward computes with them, for every reduction) is
// compared with a naive scalar loop in double; exits non-zero on any mismatch.
// Run by ctest (CMakeLists.txt).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol, const std::string& what) {
  if (got.sizes() != want.sizes()) {
    expect(false, what + ": shape differs");
    return;
  }
  const at::Tensor diff = (got.to(at::kDouble) - want).abs();
  const at::Tensor bound = want.abs() * rtol + atol;
  const bool ok = got.numel() == 0 || (diff <= bound).all().item<bool>();
  if (!ok) {
    std::printf("  max |diff| %.3g, max |want| %.3g\n", diff.max().item<double>(), want.abs().max().item<double>());
  }
  expect(ok, what);
}

// The naive reference: per-sample loss and gradients, in double, from plain loops.
struct Naive {
  std::vector<double> loss;
  at::Tensor grad_s, grad_t;  // contiguous double, the inputs' shapes
};

constexpr double kEps = 1e-12;

// ‖x̂ − ŷ‖² of two vectors and its gradients (x̂ = x / max(‖x‖, eps)); gx, gy are written.
double normalized_distance(const std::vector<double>& x, const std::vector<double>& y, std::vector<double>& gx,
                           std::vector<double>& gy) {
  double nx = 0, ny = 0;
  for (double v : x) nx += v * v;
  for (double v : y) ny += v * v;
  nx = std::sqrt(nx);
  ny = std::sqrt(ny);
  const double dx = std::max(nx, kEps), dy = std::max(ny, kEps);
  const size_t n = x.size();
  std::vector<double> r(n);
  double loss = 0, xr = 0, yr = 0;
  for (size_t i = 0; i < n; ++i) {
    r[i] = 2 * (x[i] / dx - y[i] / dy);
    loss += r[i] * r[i] / 4;
    xr += x[i] / dx * r[i];
    yr -= y[i] / dy * r[i];
  }
  gx.assign(n, 0);
  gy.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    gx[i] = (r[i] - (nx > kEps ? x[i] / dx * xr : 0)) / dx;
    gy[i] = (-r[i] - (ny > kEps ? y[i] / dy * yr : 0)) / dy;
  }
  return loss;
}

Naive naive_flat(const at::Tensor& student, const at::Tensor& teacher, int64_t mode) {
  // Logical (not memory) order: the same flattening as reshape(N, -1) of the contiguous tensor.
  const at::Tensor s = student.to(at::kDouble).contiguous(), t = teacher.to(at::kDouble).contiguous();
  const int64_t n = s.size(0), d = n ? s.numel() / n : 0;
  Naive out{std::vector<double>(n), at::zeros_like(s), at::zeros_like(t)};
  const double* ps = s.data_ptr<double>();
  const double* pt = t.data_ptr<double>();
  double* gs = out.grad_s.data_ptr<double>();
  double* gt = out.grad_t.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    if (mode == 0) {
      double sum = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double diff = ps[i * d + j] - pt[i * d + j];
        sum += diff * diff;
        gs[i * d + j] = 2 * diff / d;
        gt[i * d + j] = -2 * diff / d;
      }
      out.loss[i] = sum / d;
    } else {
      std::vector<double> x(ps + i * d, ps + (i + 1) * d), y(pt + i * d, pt + (i + 1) * d), gx, gy;
      out.loss[i] = normalized_distance(x, y, gx, gy);
      std::copy(gx.begin(), gx.end(), gs + i * d);
      std::copy(gy.begin(), gy.end(), gt + i * d);
    }
  }
  return out;
}

double d_abs_pow(double v, double p) {
  const double sign = (v > 0) - (v < 0);
  return p * std::pow(std::abs(v), p - 1) * sign;
}

Naive naive_attention(const at::Tensor& student, const at::Tensor& teacher, double p) {
  const at::Tensor s = student.to(at::kDouble).contiguous(), t = teacher.to(at::kDouble).contiguous();
  const int64_t n = s.size(0), cs = s.size(1), ct = t.size(1), hw = s.size(2) * s.size(3);
  Naive out{std::vector<double>(n), at::zeros_like(s), at::zeros_like(t)};
  const double* ps = s.data_ptr<double>();
  const double* pt = t.data_ptr<double>();
  double* gs = out.grad_s.data_ptr<double>();
  double* gt = out.grad_t.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> as(hw, 0), at_(hw, 0), gas, gat;
    for (int64_t c = 0; c < cs; ++c)
      for (int64_t k = 0; k < hw; ++k) as[k] += std::pow(std::abs(ps[(i * cs + c) * hw + k]), p);
    for (int64_t c = 0; c < ct; ++c)
      for (int64_t k = 0; k < hw; ++k) at_[k] += std::pow(std::abs(pt[(i * ct + c) * hw + k]), p);
    out.loss[i] = normalized_distance(as, at_, gas, gat);
    for (int64_t c = 0; c < cs; ++c)
      for (int64_t k = 0; k < hw; ++k) {
        const int64_t j = (i * cs + c) * hw + k;
        gs[j] = gas[k] * d_abs_pow(ps[j], p);
      }
    for (int64_t c = 0; c < ct; ++c)
      for (int64_t k = 0; k < hw; ++k) {
        const int64_t j = (i * ct + c) * hw + k;
        gt[j] = gat[k] * d_abs_pow(pt[j], p);
      }
  }
  return out;
}

void check_case(const std::string& name, const at::Tensor& s, const at::Tensor& t, int64_t mode, double p) {
  const bool fp32 = s.scalar_type() == at::kFloat;
  const auto acc = fp32 ? at::kFloat : at::kDouble;
  const double rtol = fp32 ? 1e-4 : 1e-10, atol = fp32 ? 1e-6 : 1e-12;
  const Naive want = mode == 2 ? naive_attention(s, t, p) : naive_flat(s, t, mode);
  const at::Tensor want_losses = at::tensor(want.loss, at::kDouble);
  // Gradient tolerance relative to the largest entry: the entries are differences of similar terms.
  const double gs_scale = want.grad_s.numel() ? want.grad_s.abs().max().item<double>() : 0;
  const double gt_scale = want.grad_t.numel() ? want.grad_t.abs().max().item<double>() : 0;
  const int64_t n = s.size(0);
  for (const auto& [need_s, need_t] : {std::pair{true, true}, std::pair{true, false}, std::pair{false, true}}) {
    for (int64_t reduction : {rkd_fast::kReduceNone, rkd_fast::kReduceMean, rkd_fast::kReduceSum}) {
      const std::string which = std::string(need_s ? " grad_student" : "") + (need_t ? " grad_teacher" : "") +
                                " reduction " + std::to_string(reduction);
      const auto [loss, grad_s, grad_t] = rkd_fast::feature_distance_fwd_cpu(s, t, mode, p, reduction, need_s, need_t);
      expect(loss.scalar_type() == acc, name + which + ": loss dtype");
      const at::Tensor want_loss = reduction == rkd_fast::kReduceNone ? want_losses
                                   : reduction == rkd_fast::kReduceSum ? want_losses.sum() : want_losses.mean();
      expect_close(loss, want_loss, rtol, atol, name + which + ": loss");
      // The gradients are those of the reduced loss: the per-sample ones over N for the mean.
      const double w = reduction == rkd_fast::kReduceMean ? 1.0 / n : 1.0;
      if (need_s) {
        // The gradients keep the inputs' dtype and strides (channels_last stays channels_last).
        expect(grad_s.scalar_type() == s.scalar_type() && grad_s.strides() == s.strides(), name + which + ": grad_s layout");
        expect_close(grad_s, want.grad_s * w, rtol, atol + rtol * gs_scale * w, name + which + ": grad_student");
      } else {
        expect(grad_s.numel() == 0 && grad_s.dim() == 1, name + which + ": grad_student empty");
      }
      if (need_t) {
        expect(grad_t.scalar_type() == t.scalar_type() && grad_t.strides() == t.strides(), name + which + ": grad_t layout");
        expect_close(grad_t, want.grad_t * w, rtol, atol + rtol * gt_scale * w, name + which + ": grad_teacher");
      } else {
        expect(grad_t.numel() == 0 && grad_t.dim() == 1, name + which + ": grad_teacher empty");
      }
    }
  }
}

std::string describe(const std::string& mode, at::IntArrayRef shape, bool channels_last, at::ScalarType dtype) {
  std::string out = mode + " " + c10::toString(dtype) + " [";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]" + (channels_last ? " channels_last" : "");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{4, 8, 5, 7}, {1, 3, 33, 17}, {3, 40, 1, 1}, {2, 64, 16, 16}};
  const char* mode_names[] = {"mse", "normalized", "attention"};
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (int64_t mode = 0; mode < 3; ++mode) {
      for (const auto& shape : shapes) {
        for (bool channels_last : {false, true}) {
          const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
          at::Tensor s = at::randn(shape, at::TensorOptions().dtype(dtype)).contiguous(format);
          at::Tensor t = at::randn(shape, at::TensorOptions().dtype(dtype)).contiguous(format);
          const std::string name = describe(mode_names[mode], shape, channels_last, dtype);
          check_case(name, s, t, mode, 2.0);
          if (mode == 2) {
            check_case(name + " p=1", s, t, mode, 1.0);
            check_case(name + " p=3", s, t, mode, 3.0);
            // Channel counts may differ; each map has its own layout.
            at::Tensor t_other = at::randn({shape[0], 5, shape[2], shape[3]}, at::TensorOptions().dtype(dtype));
            check_case(name + " teacher C=5 contiguous", s, t_other, mode, 2.0);
          }
        }
      }
    }
  }
  // Flat samples: lengths that are not a multiple of the vector width, one longer than a task chunk. (D = 1
  // in mode normalized has a gradient of 0 made of terms of size 2/|x|: no fixed tolerance fits it.)
  for (int64_t mode = 0; mode < 2; ++mode) {
    for (int64_t d : {int64_t{mode == 0 ? 1 : 2}, int64_t{37}, int64_t{20011}}) {
      at::Tensor s = at::randn({3, d}), t = at::randn({3, d});
      check_case(std::string(mode_names[mode]) + " flat D=" + std::to_string(d), s, t, mode, 2.0);
    }
  }
  // A sample below the norm floor: the clamp passes no gradient, as in x / x.norm().clamp_min(1e-12).
  check_case("normalized zero student", at::zeros({2, 50}), at::randn({2, 50}), 1, 2.0);
  // Values whose squares overflow float (|x| ~ 1e18): the same answer as the naive double loop.
  check_case("normalized 1e18", at::randn({2, 64, 16, 16}) * 1e18, at::randn({2, 64, 16, 16}) * 1e18, 1, 2.0);
  check_case("mse 1e18", at::randn({2, 300}) * 1e18, at::randn({2, 300}) * 1e18, 0, 2.0);
  check_case("attention p=4 3e4", at::randn({2, 16, 8, 8}) * 3e4, at::randn({2, 16, 8, 8}) * 3e4, 2, 4.0);
  // N = 0: empty outputs.
  {
    const at::Tensor s = at::randn({0, 3, 4, 4});
    for (int64_t mode = 0; mode < 3; ++mode) {
      const auto [loss, grad_s, grad_t] =
          rkd_fast::feature_distance_fwd_cpu(s, s, mode, 2.0, rkd_fast::kReduceNone, true, false);
      expect(loss.dim() == 1 && loss.numel() == 0 && grad_s.sizes() == s.sizes() && grad_t.numel() == 0,
             std::string(mode_names[mode]) + ": N = 0");
    }
  }
  // Non-finite input reaches the loss and, in mode normalized, the gradients; the other sample stays finite.
  {
    at::Tensor s = at::randn({2, 30}), t = at::randn({2, 30});
    s[1][3].fill_(std::nan(""));
    for (int64_t mode = 0; mode < 2; ++mode) {
      const auto [losses, grad_s, grad_t] =
          rkd_fast::feature_distance_fwd_cpu(s, t, mode, 2.0, rkd_fast::kReduceNone, true, false);
      expect(std::isfinite(losses[0].item<double>()) && std::isnan(losses[1].item<double>()),
             std::string(mode_names[mode]) + ": NaN propagates to the loss");
      expect(grad_s[0].isfinite().all().item<bool>() && grad_s[1].isnan().any().item<bool>(),
             std::string(mode_names[mode]) + ": NaN propagates to the gradient");
    }
  }
  // Inputs the kernels do not take raise c10::Error.
  const auto throws = [](const auto& fn) {
    try {
      fn();
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  expect(throws([] {
           rkd_fast::feature_distance_fwd_cpu(at::randn({2, 3}), at::randn({2, 3}, at::kDouble), 0, 2.0,
                                              rkd_fast::kReduceMean, true, true);
         }),
         "mixed dtypes are rejected");
  expect(throws([] {
           const at::Tensor x = at::randn({2, 3});
           rkd_fast::feature_distance_fwd_cpu(x, x, 1, 2.0, 3, true, true);
         }),
         "a reduction out of range is rejected");

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all feature_distance CPU kernel checks passed\n");
  return 0;
}
