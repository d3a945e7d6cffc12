// rkd_fast::feature_distance_fwd and feature_distance_bwd on CPU.
//
// The forward only reads: one pass over student and teacher reduces each (sample, chunk) task to a few
// partial sums, the partials are combined per sample in double, and each sample's loss and gradient
// coefficients come out of those sums (mode attention also keeps its two attention maps). The backward is one
// more pass over the inputs that writes each needed gradient once, already scaled by the upstream gradient:
// the gradient of every mode is linear in the inputs (or in the maps) with per-sample coefficients.
//
// The work is split into (sample, chunk) tasks run with at::parallel_for, so a batch of one big sample uses
// every thread as well as a batch of many small ones. Inner loops use at::vec::Vectorized in the
// accumulation type: float for float/half/bfloat16 inputs (half and bfloat16 are converted on load and
// store), double for double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rkd_fast {

namespace {

// A fresh gradient-sized buffer (32 MiB for a ResNet-18 CIFAR feature map) comes straight from mmap, and its
// first write page-faults every 4 KiB page: measured here, that fault cost was most of the backward's time.
// Asking for transparent huge pages on the buffer's 2 MiB-aligned interior cuts the faults 512-fold. A hint
// only: where THP is off or unsupported nothing changes.
void advise_huge_pages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (buffer.nbytes() < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + buffer.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)buffer;
#endif
}

}  // namespace

namespace {

constexpr double kNormEps = 1e-12;  // floor of ‖x‖, as in torch.nn.functional.normalize
// Elements of one tensor per task in modes "mse" and "normalized". Small enough that float accumulation
// stays accurate (each vector lane adds up 4096 / 16 terms before the partials are combined in double).
constexpr int64_t kFlatChunk = 4096;
// Elements (all channels of both maps) per task in mode "attention".
constexpr int64_t kAttentionChunk = 16384;
// A thread is handed at least this many elements: smaller problems run on the calling thread.
constexpr int64_t kMinWorkPerThread = 32768;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for float/half/bfloat16, double for double
template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

// Inner loops step over blocks of two accumulation vectors: the natural unit of a half/bfloat16 load
// (one Vectorized<Half> converts to two Vectorized<float>), and two independent add chains for float.
template <typename scalar_t>
constexpr int64_t block_size() {
  return 2 * AccVec<scalar_t>::size();
}

template <typename scalar_t>
inline void load_block(const scalar_t* p, AccVec<scalar_t>& lo, AccVec<scalar_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    lo = AccVec<scalar_t>::loadu(p);
    hi = AccVec<scalar_t>::loadu(p + AccVec<scalar_t>::size());
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store_block(scalar_t* p, const AccVec<scalar_t>& lo, const AccVec<scalar_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    lo.store(p);
    hi.store(p + AccVec<scalar_t>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

template <typename Vec>
inline double horizontal_sum(const Vec& v) {
  typename Vec::value_type lanes[Vec::size()];
  v.store(lanes);
  double sum = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  return sum;
}

// Runs fn(task, sample, begin, end) for every chunk [begin, end) of each of n samples of length len, in
// parallel over the n * chunks_per_sample tasks (sample-major, so each thread streams contiguous memory).
// work_per_element: elements read per unit of len, to size the grain.
template <typename F>
void parallel_chunks(int64_t n, int64_t len, int64_t chunk, int64_t work_per_element, const F& fn) {
  const int64_t chunks = (len + chunk - 1) / chunk;
  const int64_t tasks = n * chunks;
  if (tasks == 0) return;
  const int64_t work_per_task = std::max<int64_t>(1, std::min(len, chunk) * work_per_element);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / work_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / chunks, c = task % chunks;
      fn(task, sample, c * chunk, std::min(len, (c + 1) * chunk));
    }
  });
}

// ---- the normalised distance ‖x/‖x‖ − y/‖y‖‖² of two vectors, shared by "normalized" and "attention" ----

// Σx², Σy², Σxy, Σ(x−y)²: enough for the loss and the gradient coefficients (see normalized_pair).
struct PairSums {
  double xx = 0, yy = 0, xy = 0, dd = 0;
  void add(const PairSums& o) {
    xx += o.xx;
    yy += o.yy;
    xy += o.xy;
    dd += o.dd;
  }
};

// loss, and d loss / dx = ax * x + bx * y, d loss / dy = ay * y + by * x.
struct PairResult {
  double loss, ax, bx, ay, by;
};

inline double clamped_norm(double sum_sq) {
  const double norm = std::sqrt(sum_sq);
  return norm < kNormEps ? kNormEps : norm;  // NaN stays NaN
}

PairResult normalized_pair(const PairSums& m) {
  const double dx = clamped_norm(m.xx), dy = clamped_norm(m.yy);
  // ‖x̂ − ŷ‖² written around the larger norm, so that no term is much larger than the result: 2 − 2 cos
  // would cancel when x̂ ≈ ŷ, and dividing by the smaller norm would blow up when it is near the floor.
  // dx ≥ dy: x̂ − ŷ = (x − y)/dx + k y;  dx < dy: x̂ − ŷ = (x − y)/dy + k x;  k = 1/dx − 1/dy.
  const double k = 1.0 / dx - 1.0 / dy;
  const double loss = dx >= dy ? m.dd / (dx * dx) + 2.0 * k * (m.xy - m.yy) / dx + k * k * m.yy
                               : m.dd / (dy * dy) + 2.0 * k * (m.xx - m.xy) / dy + k * k * m.xx;
  // With r = 2(x̂ − ŷ): d loss / dx = (r − x̂ (x̂·r)) / dx above the floor and r / dx below it (the clamp
  // passes no gradient); x̂·r = 2(Σx²/dx² − Σxy/(dx dy)). The same for y with −r.
  const double cross = m.xy / (dx * dy);
  const double xr = std::sqrt(m.xx) > kNormEps ? 2.0 * (m.xx / (dx * dx) - cross) : 0.0;
  const double yr = std::sqrt(m.yy) > kNormEps ? 2.0 * (m.yy / (dy * dy) - cross) : 0.0;
  const double b = -2.0 / (dx * dy);
  return {loss, (2.0 - xr) / (dx * dx), b, (2.0 - yr) / (dy * dy), b};
}

template <typename scalar_t>
PairSums pair_sums(const scalar_t* x, const scalar_t* y, int64_t len) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  Vec xx0(0), xx1(0), yy0(0), yy1(0), xy0(0), xy1(0), dd0(0), dd1(0);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec x0, x1, y0, y1;
    load_block(x + i, x0, x1);
    load_block(y + i, y0, y1);
    const Vec d0 = x0 - y0, d1 = x1 - y1;
    xx0 = at::vec::fmadd(x0, x0, xx0);
    xx1 = at::vec::fmadd(x1, x1, xx1);
    yy0 = at::vec::fmadd(y0, y0, yy0);
    yy1 = at::vec::fmadd(y1, y1, yy1);
    dd0 = at::vec::fmadd(d0, d0, dd0);
    dd1 = at::vec::fmadd(d1, d1, dd1);
    xy0 = at::vec::fmadd(x0, y0, xy0);
    xy1 = at::vec::fmadd(x1, y1, xy1);
  }
  PairSums out{horizontal_sum(xx0 + xx1), horizontal_sum(yy0 + yy1), horizontal_sum(xy0 + xy1),
               horizontal_sum(dd0 + dd1)};
  acc xx = 0, yy = 0, xy = 0, dd = 0;
  for (; i < len; ++i) {
    const acc xv = static_cast<acc>(x[i]), yv = static_cast<acc>(y[i]), d = xv - yv;
    xx += xv * xv;
    yy += yv * yv;
    xy += xv * yv;
    dd += d * d;
  }
  out.add({xx, yy, xy, dd});
  return out;
}

// gx = ax * x + bx * y and gy = ay * y + by * x over [0, len); either output may be null. Each block is
// loaded before it is stored, so gx may alias x and gy may alias y.
template <typename scalar_t, typename out_t>
void pair_grads(const scalar_t* x, const scalar_t* y, int64_t len, const PairResult& r, out_t* gx, out_t* gy) {
  static_assert(std::is_same_v<acc_t<scalar_t>, acc_t<out_t>>);
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const acc ax = r.ax, bx = r.bx, ay = r.ay, by = r.by;
  const Vec vax(ax), vbx(bx), vay(ay), vby(by);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec x0, x1, y0, y1;
    load_block(x + i, x0, x1);
    load_block(y + i, y0, y1);
    if (gx) store_block(gx + i, at::vec::fmadd(vax, x0, vbx * y0), at::vec::fmadd(vax, x1, vbx * y1));
    if (gy) store_block(gy + i, at::vec::fmadd(vay, y0, vby * x0), at::vec::fmadd(vay, y1, vby * x1));
  }
  for (; i < len; ++i) {
    const acc xv = static_cast<acc>(x[i]), yv = static_cast<acc>(y[i]);
    if (gx) gx[i] = static_cast<out_t>(ax * xv + bx * yv);
    if (gy) gy[i] = static_cast<out_t>(ay * yv + by * xv);
  }
}

// ---- the per-sample coefficients: d loss_i / d x = c0 x + c1 y, d loss_i / d y = c2 x + c3 y ----

template <typename acc>
void store_coeffs(acc* c, const PairResult& r) {
  c[0] = static_cast<acc>(r.ax);
  c[1] = static_cast<acc>(r.bx);
  c[2] = static_cast<acc>(r.by);
  c[3] = static_cast<acc>(r.ay);
}

// The coefficients of every sample times grad_losses[i], in double, as the PairResult pair_grads takes.
template <typename acc>
std::vector<PairResult> scaled_coeffs(const at::Tensor& grad_losses, const at::Tensor& coeffs) {
  const int64_t n = coeffs.size(0);
  const acc* g = grad_losses.const_data_ptr<acc>();
  const acc* c = coeffs.const_data_ptr<acc>();
  std::vector<PairResult> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    out[i] = {0, gi * c[4 * i], gi * c[4 * i + 1], gi * c[4 * i + 3], gi * c[4 * i + 2]};
  }
  return out;
}

// Chunks of hw covering about kAttentionChunk elements (over `channels` channels), a multiple of the widest
// block.
inline int64_t attention_chunk(int64_t channels) {
  return std::max<int64_t>(32, kAttentionChunk / channels / 32 * 32);
}

// ---- modes "mse" and "normalized": each sample is one flat block of len elements in both tensors ----

// Σ(s−t)² over [0, len).
template <typename scalar_t>
double mse_sum(const scalar_t* s, const scalar_t* t, int64_t len) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  Vec sum0(0), sum1(0);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec s0, s1, t0, t1;
    load_block(s + i, s0, s1);
    load_block(t + i, t0, t1);
    const Vec d0 = s0 - t0, d1 = s1 - t1;
    sum0 = at::vec::fmadd(d0, d0, sum0);
    sum1 = at::vec::fmadd(d1, d1, sum1);
  }
  acc tail = 0;
  for (; i < len; ++i) {
    const acc d = static_cast<acc>(s[i]) - static_cast<acc>(t[i]);
    tail += d * d;
  }
  return horizontal_sum(sum0 + sum1) + tail;
}

// gs = as (s − t) and gt = at (t − s) over [0, len); either output may be null. The difference is taken
// first: as·s − as·t would lose the digits that s ≈ t share.
template <typename scalar_t>
void mse_grads(const scalar_t* s, const scalar_t* t, int64_t len, acc_t<scalar_t> as, acc_t<scalar_t> at_,
               scalar_t* gs, scalar_t* gt) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const Vec vs(as), vt(-at_);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Vec s0, s1, t0, t1;
    load_block(s + i, s0, s1);
    load_block(t + i, t0, t1);
    const Vec d0 = s0 - t0, d1 = s1 - t1;
    if (gs) store_block(gs + i, vs * d0, vs * d1);
    if (gt) store_block(gt + i, vt * d0, vt * d1);
  }
  for (; i < len; ++i) {
    const acc d = static_cast<acc>(s[i]) - static_cast<acc>(t[i]);
    if (gs) gs[i] = static_cast<scalar_t>(as * d);
    if (gt) gt[i] = static_cast<scalar_t>(-at_ * d);
  }
}

// Pass 1 and the per-sample finalisation: losses[i] and coeffs[i] = (c0, c1, c2, c3).
template <typename scalar_t>
void flat_forward(const at::Tensor& student, const at::Tensor& teacher, int64_t mode, at::Tensor& losses,
                  at::Tensor& coeffs) {
  using acc = acc_t<scalar_t>;
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t len = student.numel() / n;
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  acc* out = losses.mutable_data_ptr<acc>();
  acc* cf = coeffs.mutable_data_ptr<acc>();
  const int64_t chunks = (len + kFlatChunk - 1) / kFlatChunk;

  if (mode == kMse) {
    std::vector<double> partial(n * chunks);
    parallel_chunks(n, len, kFlatChunk, 2, [&](int64_t task, int64_t i, int64_t b, int64_t e) {
      partial[task] = mse_sum(s + i * len + b, t + i * len + b, e - b);
    });
    const double d = static_cast<double>(len), scale = 2.0 / d;
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[i * chunks + c];
      out[i] = static_cast<acc>(sum / d);  // len == 0 gives NaN, as torch.mean
      store_coeffs(cf + 4 * i, {0, scale, -scale, scale, -scale});
    }
    return;
  }

  std::vector<PairSums> partial(n * chunks);
  parallel_chunks(n, len, kFlatChunk, 2, [&](int64_t task, int64_t i, int64_t b, int64_t e) {
    partial[task] = pair_sums(s + i * len + b, t + i * len + b, e - b);
  });
  for (int64_t i = 0; i < n; ++i) {
    PairSums sums;
    for (int64_t c = 0; c < chunks; ++c) sums.add(partial[i * chunks + c]);
    const PairResult r = normalized_pair(sums);
    out[i] = static_cast<acc>(r.loss);
    store_coeffs(cf + 4 * i, r);
  }
}

// One pass over s and t writing grad_losses[i] * d loss_i / d s_i and / d t_i (either may be skipped).
template <typename scalar_t>
void flat_backward(const at::Tensor& grad_losses, const at::Tensor& student, const at::Tensor& teacher,
                   const at::Tensor& coeffs, int64_t mode, at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc = acc_t<scalar_t>;
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t len = student.numel() / n;
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s.numel() ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t.numel() ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
  if (!gs && !gt) return;
  const std::vector<PairResult> scaled = scaled_coeffs<acc>(grad_losses, coeffs);
  parallel_chunks(n, len, kFlatChunk, 3, [&](int64_t, int64_t i, int64_t b, int64_t e) {
    const int64_t off = i * len + b;
    const PairResult& r = scaled[i];
    if (mode == kMse) {  // c1 = −c0 and c2 = −c3: the gradients are multiples of s − t
      mse_grads(s + off, t + off, e - b, static_cast<acc>(r.ax), static_cast<acc>(r.ay), gs ? gs + off : nullptr,
                gt ? gt + off : nullptr);
    } else {
      pair_grads(s + off, t + off, e - b, r, gs ? gs + off : nullptr, gt ? gt + off : nullptr);
    }
  });
}

// ---- mode "attention": a[hw] = Σ_c |F[c, hw]|^p, normalised over hw ----

// Where element (c, hw) of a sample lies: c * c_stride + hw * hw_stride (contiguous: c_stride = H*W and
// hw_stride = 1; channels_last: c_stride = 1 and hw_stride = C).
struct MapLayout {
  int64_t channels, sample_stride, c_stride, hw_stride;
};

MapLayout map_layout(const at::Tensor& x) {
  // (h, w) flattens to hw = h*W + w when stride(2) == W * stride(3), or trivially when H or W is 1.
  const int64_t h = x.size(2), w = x.size(3);
  TORCH_CHECK(h <= 1 || w <= 1 || x.stride(2) == w * x.stride(3),
              "feature_distance_fwd: attention maps need H and W to flatten, got strides ", x.strides());
  return {x.size(1), x.stride(0), x.stride(1), w > 1 ? x.stride(3) : x.stride(2)};
}

// The exponent p as a template parameter, so the inner loops do not branch on it.
enum PowKind { kPowGeneral = 0, kPowOne = 1, kPowTwo = 2 };

template <int kPow, typename Vec>
inline Vec abs_pow(const Vec& x, const Vec& p) {
  if constexpr (kPow == kPowTwo) return x * x;
  else if constexpr (kPow == kPowOne) return x.abs();
  else return x.abs().pow(p);
}

template <int kPow, typename acc>
inline acc scalar_abs_pow(acc x, acc p) {
  if constexpr (kPow == kPowTwo) return x * x;
  else if constexpr (kPow == kPowOne) return std::abs(x);
  else return std::pow(std::abs(x), p);
}

template <typename Vec>
inline Vec sign(const Vec& x) {
  const Vec zero(0), one(1);
  return ((x > zero) & one) - ((x < zero) & one);  // comparisons give all-ones lanes; sign(0) = 0
}

template <typename acc>
inline acc scalar_sign(acc x) {
  return static_cast<acc>((x > 0) - (x < 0));
}

// d |x|^p / dx = p |x|^(p−1) sign(x) (2x for p = 2, sign(x) for p = 1).
template <int kPow, typename Vec>
inline Vec abs_pow_grad(const Vec& x, const Vec& p, const Vec& p_minus_1) {
  if constexpr (kPow == kPowTwo) return x + x;
  else if constexpr (kPow == kPowOne) return sign(x);
  else return p * x.abs().pow(p_minus_1) * sign(x);
}

template <int kPow, typename acc>
inline acc scalar_abs_pow_grad(acc x, acc p, acc p_minus_1) {
  if constexpr (kPow == kPowTwo) return x + x;
  else if constexpr (kPow == kPowOne) return scalar_sign(x);
  else return p * std::pow(std::abs(x), p_minus_1) * scalar_sign(x);
}

// a[hw − h0] = Σ_c |x[c, hw]|^p for hw in [h0, h1).
template <int kPow, typename scalar_t>
void attention_map_chunk(const scalar_t* x, const MapLayout& l, int64_t h0, int64_t h1, acc_t<scalar_t> p,
                         acc_t<scalar_t>* a) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const Vec vp(p);
  const int64_t len = h1 - h0;
  if (l.hw_stride == 1) {  // contiguous: vectorise along hw, one channel row at a time
    std::fill(a, a + len, acc(0));
    for (int64_t c = 0; c < l.channels; ++c) {
      const scalar_t* row = x + c * l.c_stride + h0;
      int64_t i = 0;
      for (; i + kBlock <= len; i += kBlock) {
        Vec x0, x1;
        load_block(row + i, x0, x1);
        (Vec::loadu(a + i) + abs_pow<kPow>(x0, vp)).store(a + i);
        (Vec::loadu(a + i + Vec::size()) + abs_pow<kPow>(x1, vp)).store(a + i + Vec::size());
      }
      for (; i < len; ++i) a[i] += scalar_abs_pow<kPow>(static_cast<acc>(row[i]), p);
    }
  } else if (l.c_stride == 1) {  // channels_last: vectorise the sum along c
    for (int64_t hw = h0; hw < h1; ++hw) {
      const scalar_t* col = x + hw * l.hw_stride;
      Vec sum0(0), sum1(0);
      int64_t c = 0;
      for (; c + kBlock <= l.channels; c += kBlock) {
        Vec x0, x1;
        load_block(col + c, x0, x1);
        sum0 = sum0 + abs_pow<kPow>(x0, vp);
        sum1 = sum1 + abs_pow<kPow>(x1, vp);
      }
      acc tail = 0;
      for (; c < l.channels; ++c) tail += scalar_abs_pow<kPow>(static_cast<acc>(col[c]), p);
      a[hw - h0] = static_cast<acc>(horizontal_sum(sum0 + sum1)) + tail;
    }
  } else {  // any other strides (not produced by the Python side): plain loops
    for (int64_t hw = h0; hw < h1; ++hw) {
      acc sum = 0;
      for (int64_t c = 0; c < l.channels; ++c)
        sum += scalar_abs_pow<kPow>(static_cast<acc>(x[c * l.c_stride + hw * l.hw_stride]), p);
      a[hw - h0] = sum;
    }
  }
}

// grad[c, hw] = g[hw − h0] * d|x[c, hw]|^p/dx for hw in [h0, h1); grad has x's strides.
template <int kPow, typename scalar_t>
void attention_grad_chunk(const scalar_t* x, const MapLayout& l, int64_t h0, int64_t h1, acc_t<scalar_t> p,
                          const acc_t<scalar_t>* g, scalar_t* grad) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const Vec vp(p), vpm1(p - 1);
  const acc pm1 = p - 1;
  const int64_t len = h1 - h0;
  if (l.hw_stride == 1) {
    for (int64_t c = 0; c < l.channels; ++c) {
      const int64_t off = c * l.c_stride + h0;
      int64_t i = 0;
      for (; i + kBlock <= len; i += kBlock) {
        Vec x0, x1;
        load_block(x + off + i, x0, x1);
        store_block(grad + off + i, Vec::loadu(g + i) * abs_pow_grad<kPow>(x0, vp, vpm1),
                    Vec::loadu(g + i + Vec::size()) * abs_pow_grad<kPow>(x1, vp, vpm1));
      }
      for (; i < len; ++i)
        grad[off + i] = static_cast<scalar_t>(g[i] * scalar_abs_pow_grad<kPow>(static_cast<acc>(x[off + i]), p, pm1));
    }
  } else if (l.c_stride == 1) {
    for (int64_t hw = h0; hw < h1; ++hw) {
      const int64_t off = hw * l.hw_stride;
      const acc gv = g[hw - h0];
      const Vec vg(gv);
      int64_t c = 0;
      for (; c + kBlock <= l.channels; c += kBlock) {
        Vec x0, x1;
        load_block(x + off + c, x0, x1);
        store_block(grad + off + c, vg * abs_pow_grad<kPow>(x0, vp, vpm1), vg * abs_pow_grad<kPow>(x1, vp, vpm1));
      }
      for (; c < l.channels; ++c)
        grad[off + c] = static_cast<scalar_t>(gv * scalar_abs_pow_grad<kPow>(static_cast<acc>(x[off + c]), p, pm1));
    }
  } else {
    for (int64_t hw = h0; hw < h1; ++hw)
      for (int64_t c = 0; c < l.channels; ++c) {
        const int64_t off = c * l.c_stride + hw * l.hw_stride;
        grad[off] = static_cast<scalar_t>(g[hw - h0] * scalar_abs_pow_grad<kPow>(static_cast<acc>(x[off]), p, pm1));
      }
  }
}

template <int kPow, typename scalar_t>
void attention_forward(const at::Tensor& student, const at::Tensor& teacher, double p, at::Tensor& losses,
                       at::Tensor& coeffs, at::Tensor& map_s, at::Tensor& map_t) {
  using acc = acc_t<scalar_t>;
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t hw = student.size(2) * student.size(3);
  const MapLayout ls = map_layout(student), lt = map_layout(teacher);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  acc* out = losses.mutable_data_ptr<acc>();
  acc* cf = coeffs.mutable_data_ptr<acc>();
  acc* as = map_s.mutable_data_ptr<acc>();
  acc* at_ = map_t.mutable_data_ptr<acc>();
  const acc pa = static_cast<acc>(p);
  const int64_t channels = std::max<int64_t>(1, ls.channels + lt.channels);
  const int64_t chunk = attention_chunk(channels);
  const int64_t chunks = (hw + chunk - 1) / chunk;

  std::vector<PairSums> partial(n * chunks);
  parallel_chunks(n, hw, chunk, channels, [&](int64_t task, int64_t i, int64_t b, int64_t e) {
    acc* a_s = as + i * hw + b;
    acc* a_t = at_ + i * hw + b;
    attention_map_chunk<kPow>(s + i * ls.sample_stride, ls, b, e, pa, a_s);
    attention_map_chunk<kPow>(t + i * lt.sample_stride, lt, b, e, pa, a_t);
    partial[task] = pair_sums(a_s, a_t, e - b);
  });
  for (int64_t i = 0; i < n; ++i) {
    PairSums sums;
    for (int64_t c = 0; c < chunks; ++c) sums.add(partial[i * chunks + c]);
    const PairResult r = normalized_pair(sums);
    out[i] = static_cast<acc>(r.loss);
    store_coeffs(cf + 4 * i, r);
  }
}

// d loss / d a from the saved maps, chunk by chunk into a task-local buffer (the saved maps are inputs of
// the backward and stay untouched), then through d|F|^p/dF into the input gradients.
template <int kPow, typename scalar_t>
void attention_backward(const at::Tensor& grad_losses, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& coeffs, const at::Tensor& map_s, const at::Tensor& map_t, double p,
                        at::Tensor& grad_s, at::Tensor& grad_t) {
  using acc = acc_t<scalar_t>;
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t hw = student.size(2) * student.size(3);
  const MapLayout ls = map_layout(student), lt = map_layout(teacher);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s.numel() ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t.numel() ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
  if (!gs && !gt) return;
  // The gradients are written through the inputs' strides: empty_like keeps them for these layouts.
  TORCH_INTERNAL_ASSERT(!gs || grad_s.strides() == student.strides());
  TORCH_INTERNAL_ASSERT(!gt || grad_t.strides() == teacher.strides());
  const acc* as = map_s.const_data_ptr<acc>();
  const acc* at_ = map_t.const_data_ptr<acc>();
  const acc pa = static_cast<acc>(p);
  const std::vector<PairResult> scaled = scaled_coeffs<acc>(grad_losses, coeffs);
  const int64_t channels = std::max<int64_t>(1, (gs ? ls.channels : 0) + (gt ? lt.channels : 0));
  const int64_t chunk = attention_chunk(channels);
  parallel_chunks(n, hw, chunk, channels * 2, [&](int64_t, int64_t i, int64_t b, int64_t e) {
    const int64_t len = e - b;
    std::vector<acc> buffer((gs ? len : 0) + (gt ? len : 0));
    acc* g_s = gs ? buffer.data() : nullptr;
    acc* g_t = gt ? buffer.data() + (gs ? len : 0) : nullptr;
    pair_grads(as + i * hw + b, at_ + i * hw + b, len, scaled[i], g_s, g_t);
    if (gs) attention_grad_chunk<kPow>(s + i * ls.sample_stride, ls, b, e, pa, g_s, gs + i * ls.sample_stride);
    if (gt) attention_grad_chunk<kPow>(t + i * lt.sample_stride, lt, b, e, pa, g_t, gt + i * lt.sample_stride);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cpu(const at::Tensor& student,
                                                                                    const at::Tensor& teacher,
                                                                                    int64_t mode, double p) {
  check_feature_distance_inputs("feature_distance_fwd", student, teacher, mode, p, c10::DeviceType::CPU);
  const int64_t n = student.size(0);
  const auto acc_options = student.options().dtype(accumulate_dtype(student));
  at::Tensor losses = at::empty({n}, acc_options);
  at::Tensor coeffs = at::empty({n, 4}, acc_options);
  const bool maps = mode == kAttention;
  at::Tensor map_s = maps ? at::empty({n, student.size(2) * student.size(3)}, acc_options) : at::empty({0}, acc_options);
  at::Tensor map_t = maps ? at::empty({n, student.size(2) * student.size(3)}, acc_options) : at::empty({0}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_fwd_cpu", [&] {
    if (!maps) {
      flat_forward<scalar_t>(student, teacher, mode, losses, coeffs);
    } else if (p == 2.0) {
      attention_forward<kPowTwo, scalar_t>(student, teacher, p, losses, coeffs, map_s, map_t);
    } else if (p == 1.0) {
      attention_forward<kPowOne, scalar_t>(student, teacher, p, losses, coeffs, map_s, map_t);
    } else {
      attention_forward<kPowGeneral, scalar_t>(student, teacher, p, losses, coeffs, map_s, map_t);
    }
  });
  return {losses, coeffs, map_s, map_t};
}

std::tuple<at::Tensor, at::Tensor> feature_distance_bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& coeffs,
                                                            const at::Tensor& map_s, const at::Tensor& map_t,
                                                            int64_t mode, double p, bool grad_student,
                                                            bool grad_teacher) {
  check_feature_distance_inputs("feature_distance_bwd", student, teacher, mode, p, c10::DeviceType::CPU);
  check_feature_distance_saved(grad_losses, coeffs, map_s, map_t, student, mode);
  const bool maps = mode == kAttention;
  at::Tensor grad_s = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  advise_huge_pages(grad_s);
  advise_huge_pages(grad_t);
  // Modes 0/1 write the gradients in the inputs' flat element order: empty_like keeps it for these layouts.
  TORCH_INTERNAL_ASSERT(!grad_student || grad_s.strides() == student.strides());
  TORCH_INTERNAL_ASSERT(!grad_teacher || grad_t.strides() == teacher.strides());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_bwd_cpu", [&] {
    if (!maps) {
      flat_backward<scalar_t>(grad_losses, student, teacher, coeffs, mode, grad_s, grad_t);
    } else if (p == 2.0) {
      attention_backward<kPowTwo, scalar_t>(grad_losses, student, teacher, coeffs, map_s, map_t, p, grad_s, grad_t);
    } else if (p == 1.0) {
      attention_backward<kPowOne, scalar_t>(grad_losses, student, teacher, coeffs, map_s, map_t, p, grad_s, grad_t);
    } else {
      attention_backward<kPowGeneral, scalar_t>(grad_losses, student, teacher, coeffs, map_s, map_t, p, grad_s,
                                                grad_t);
    }
  });
  return {grad_s, grad_t};
}

TORCH_LIBRARY_IMPL(rkd_fast, CPU, m) {
  m.impl("feature_distance_fwd", &feature_distance_fwd_cpu);
  m.impl("feature_distance_bwd", &feature_distance_bwd_cpu);
}

}  // namespace rkd_fast
