// rkd_fast::feature_distance_fwd on CPU: the reduced loss and, for each input whose flag is set, the gradient of
// that loss (for an upstream gradient of one), in one pass over the inputs.
//
// Per sample: its statistics come first (sums over the flat sample, or over its two attention maps), reduced per
// chunk in the accumulation type and combined in double; then the sample's loss and the coefficients of its
// gradient; then a second walk over the sample writes the gradient while the sample is still in this core's
// cache (a CIFAR ResNet-18 sample of student and teacher, 512 KiB, fits a 1 MiB L2; an ImageNet one, 6 MiB, the
// L3). Memory sees each input read once and each gradient written once. Samples are spread over the threads;
// with too few samples to keep every thread busy, the threads share each sample instead, each walking the same
// chunks in both phases. The partial sums are combined in one fixed order either way, so the results do not
// depend on the thread count.
//
// Every gradient is linear in the inputs (or, in mode attention, in the maps) with per-sample coefficients:
// d loss_i / d x = ax x + bx y, d loss_i / d y = ay y + by x. Inner loops use at::vec::Vectorized in the
// accumulation type: float for float/half/bfloat16 inputs (half and bfloat16 converted on load and store),
// double for double.
//
// Values whose squares overflow the accumulation type (|x| > 1.8e19 in float, say) give non-finite sums from
// finite inputs: such a sample is redone in double on its inputs scaled by a power of two (see "rescaled").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu/vec_blocks.h"
#include "kernels.h"
#include "normalized_pair.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rkd_fast {

namespace {

// ---- gradient buffers ----
// A fresh gradient-sized buffer (32 MiB for a ResNet-18 CIFAR feature map) comes straight from mmap: its first write
// page-faults every page and has the kernel zero it. Measured on this project's 2-core VM (the fastest of ~100
// calls): a fresh 32 MiB buffer filled once costs 17 ms against 2.5 ms for filling one already in use, more than
// the rest of the op. A training loop asks for the same sizes every step, so the buffers the op's gradients leave
// behind are kept (the most recent, up to kCacheBytes in all) and handed out again for the same size; each new one
// gets a transparent-huge-page hint (512 times fewer faults where THP is on). Buffers below kCachedFrom come from
// the default allocator, whose heap reuses them anyway.
constexpr size_t kCachedFrom = size_t{4} << 20;
constexpr size_t kCacheBytes = size_t{256} << 20;

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);  // the 2 MiB-aligned interior
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint only
#else
  (void)data;
  (void)bytes;
#endif
}

class GradientBuffers final : public c10::Allocator {
 public:
  static GradientBuffers& instance() {
    static auto* buffers = new GradientBuffers;  // never destroyed: a gradient may be freed after static destructors
    return *buffers;
  }

  c10::DataPtr allocate(size_t bytes) override {
    void* data = take(bytes);
    if (data == nullptr) {
      data = c10::alloc_cpu(bytes);
      advise_huge_pages(data, bytes);
    }
    return {data, new Block{data, bytes}, &GradientBuffers::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  static void release(void* context) {
    const auto* block = static_cast<Block*>(context);
    instance().keep(*block);
    delete block;
  }

  void* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.end(); it != free_.begin();) {  // the most recently freed first
      --it;
      if (it->bytes == bytes) {
        void* data = it->data;
        cached_ -= bytes;
        free_.erase(it);
        return data;
      }
    }
    return nullptr;
  }

  void keep(const Block& block) {
    const std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(block);
    cached_ += block.bytes;
    while (cached_ > kCacheBytes) {  // the oldest go first
      c10::free_cpu(free_.front().data);
      cached_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_ = 0;
};

// An uninitialised tensor with x's sizes, strides and dtype, for x's gradient.
at::Tensor gradient_like(const at::Tensor& x) {
  if (x.nbytes() < kCachedFrom) return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &GradientBuffers::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

constexpr double kNormEps = 1e-12;  // floor of ‖x‖, as in torch.nn.functional.normalize
// Elements of one tensor per chunk in modes "mse" and "normalized". Small enough that float accumulation
// stays accurate (each vector lane adds up 4096 / 16 terms before the partials are combined in double).
constexpr int64_t kFlatChunk = 4096;
// Elements (all channels of both maps) per chunk in mode "attention".
constexpr int64_t kAttentionChunk = 16384;
// A thread is handed at least this many elements: smaller problems run on the calling thread.
constexpr int64_t kMinWorkPerThread = 32768;

// ---- the driver: statistics, then the loss, then the gradient, per sample ----

// For each of n samples of `chunks` chunks: stats(i, c) for every chunk, then finish(i), then grads(i, c) for
// every chunk (see the top of the file). chunk_work: elements read per chunk, to size the work per thread.
template <typename Stats, typename Finish, typename Grads>
void per_sample(int64_t n, int64_t chunks, int64_t chunk_work, const Stats& stats, const Finish& finish,
                const Grads& grads) {
  const int64_t sample_work = std::max<int64_t>(1, chunks * chunk_work);
  const bool share_samples = n < 4 * at::get_num_threads() && chunks > 1 && sample_work >= 2 * kMinWorkPerThread;
  if (!share_samples) {
    at::parallel_for(0, n, std::max<int64_t>(1, kMinWorkPerThread / sample_work), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t c = 0; c < chunks; ++c) stats(i, c);
        finish(i);
        for (int64_t c = 0; c < chunks; ++c) grads(i, c);
      }
    });
    return;
  }
  // Both parallel_for calls split [0, chunks) the same way, so each thread re-reads the chunks it just read.
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, chunk_work));
  for (int64_t i = 0; i < n; ++i) {
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) stats(i, c);
    });
    finish(i);
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) grads(i, c);
    });
  }
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
  bool finite() const { return std::isfinite(xx) && std::isfinite(yy) && std::isfinite(xy) && std::isfinite(dd); }
};

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

// gx = ax * x + bx * y and gy = ay * y + by * x over [0, len); either output may be null.
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

// ---- mode "mse" ----

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

// gs = a (s − t) and gt = −a (s − t) over [0, len); either output may be null. The difference is taken
// first: a·s − a·t would lose the digits that s ≈ t share.
template <typename scalar_t>
void mse_grads(const scalar_t* s, const scalar_t* t, int64_t len, acc_t<scalar_t> a, scalar_t* gs, scalar_t* gt) {
  using Vec = AccVec<scalar_t>;
  using acc = acc_t<scalar_t>;
  constexpr int64_t kBlock = block_size<scalar_t>();
  const Vec vs(a), vt(-a);
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
    if (gs) gs[i] = static_cast<scalar_t>(a * d);
    if (gt) gt[i] = static_cast<scalar_t>(-a * d);
  }
}

// ---- mode "attention": a[hw] = Σ_c |F[c, hw]|^p, normalised over hw ----

// Where element (c, hw) of a sample lies: c * c_stride + hw * hw_stride (contiguous: c_stride = H*W and
// hw_stride = 1; channels_last: c_stride = 1 and hw_stride = C). Either way a sample is one block of C*H*W.
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

// d |x|^p / dx = p |x|^(p−1) sign(x) (2x for p = 2, sign(x) for p = 1), and 0 at x = 0 for every p: for p < 1
// |x|^p has no derivative there, and 0, the subgradient, keeps ReLU features (exact zeros) from giving
// p · inf · 0 = NaN. NaN stays NaN.
template <int kPow, typename Vec>
inline Vec abs_pow_grad(const Vec& x, const Vec& p, const Vec& p_minus_1) {
  if constexpr (kPow == kPowTwo) return x + x;
  else if constexpr (kPow == kPowOne) return sign(x);
  else return (p * x.abs().pow(p_minus_1) * sign(x)) & (x != Vec(0));
}

template <int kPow, typename acc>
inline acc scalar_abs_pow_grad(acc x, acc p, acc p_minus_1) {
  if constexpr (kPow == kPowTwo) return x + x;
  else if constexpr (kPow == kPowOne) return scalar_sign(x);
  else return x == 0 ? acc(0) : p * std::pow(std::abs(x), p_minus_1) * scalar_sign(x);
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

// Chunks of hw covering about kAttentionChunk elements (over `channels` channels), a multiple of the widest
// block.
inline int64_t attention_chunk(int64_t channels) {
  return std::max<int64_t>(32, kAttentionChunk / channels / 32 * 32);
}

// ---- rescaled: a sample whose sums overflowed, redone in double on its inputs scaled by a power of two ----
// The distances do not change when an input is scaled (its norm floor scaled with it), and each gradient
// scales back by the same factor, so the scale is exact. Scalar loops: this path is rare.

// 2^-e where 2^(e-1) <= max |x[j]| < 2^e (1 for all zeros), or 0 when some x[j] is not finite: then the sums
// were not finite because of the input itself, and the ordinary path's NaN or inf is the answer.
template <typename scalar_t>
double inverse_scale(const scalar_t* x, int64_t len) {
  double largest = 0;
  for (int64_t j = 0; j < len; ++j) {
    const double v = std::abs(static_cast<double>(x[j]));
    if (!std::isfinite(v)) return 0;
    largest = std::max(largest, v);
  }
  int e = 0;
  std::frexp(largest, &e);
  return std::ldexp(1.0, -e);
}

template <typename scalar_t>
bool mse_rescaled(const scalar_t* s, const scalar_t* t, int64_t len, double weight, double& loss, scalar_t* gs,
                  scalar_t* gt) {
  double largest = 0;
  for (int64_t j = 0; j < len; ++j) {
    const double d = std::abs(static_cast<double>(s[j]) - static_cast<double>(t[j]));
    if (!std::isfinite(d)) return false;
    largest = std::max(largest, d);
  }
  int e = 0;
  std::frexp(largest, &e);
  double sum = 0;
  for (int64_t j = 0; j < len; ++j) {
    const double d = std::ldexp(static_cast<double>(s[j]) - static_cast<double>(t[j]), -e);
    sum += d * d;
  }
  loss = std::ldexp(sum / static_cast<double>(len), 2 * e);
  const double a = 2.0 * weight / static_cast<double>(len);
  for (int64_t j = 0; j < len; ++j) {
    const double d = static_cast<double>(s[j]) - static_cast<double>(t[j]);
    if (gs) gs[j] = static_cast<scalar_t>(a * d);
    if (gt) gt[j] = static_cast<scalar_t>(-a * d);
  }
  return true;
}

template <typename scalar_t>
bool normalized_rescaled(const scalar_t* x, const scalar_t* y, int64_t len, double weight, double& loss,
                         scalar_t* gx, scalar_t* gy) {
  const double sx = inverse_scale(x, len), sy = inverse_scale(y, len);
  if (sx == 0 || sy == 0) return false;
  PairSums m;
  for (int64_t j = 0; j < len; ++j) {
    const double xv = sx * static_cast<double>(x[j]), yv = sy * static_cast<double>(y[j]);
    m.add({xv * xv, yv * yv, xv * yv, (xv - yv) * (xv - yv)});
  }
  const PairResult r = normalized_pair(m.xx, m.yy, m.xy, m.dd, kNormEps * sx, kNormEps * sy).scaled(weight);
  loss = r.loss;
  for (int64_t j = 0; j < len; ++j) {  // d loss / dx = sx · d loss / d(sx x)
    const double xv = sx * static_cast<double>(x[j]), yv = sy * static_cast<double>(y[j]);
    if (gx) gx[j] = static_cast<scalar_t>(sx * (r.ax * xv + r.bx * yv));
    if (gy) gy[j] = static_cast<scalar_t>(sy * (r.ay * yv + r.by * xv));
  }
  return true;
}

double d_abs_pow(double v, double p) {
  return v == 0 ? 0.0 : p * std::pow(std::abs(v), p - 1) * ((v > 0) - (v < 0));
}

// Mode attention on F_s·ss and F_t·st: the maps scale by ss^p and st^p, and so do their norm floors.
template <typename scalar_t>
bool attention_rescaled(const scalar_t* s, const MapLayout& ls, const scalar_t* t, const MapLayout& lt, int64_t hw,
                        double p, double weight, double& loss, scalar_t* gs, scalar_t* gt) {
  const double ss = inverse_scale(s, ls.channels * hw), st = inverse_scale(t, lt.channels * hw);
  if (ss == 0 || st == 0) return false;
  const auto index = [](const MapLayout& l, int64_t c, int64_t k) { return c * l.c_stride + k * l.hw_stride; };
  std::vector<double> a_s(hw, 0.0), a_t(hw, 0.0);
  for (int64_t k = 0; k < hw; ++k) {
    for (int64_t c = 0; c < ls.channels; ++c) a_s[k] += std::pow(std::abs(ss * static_cast<double>(s[index(ls, c, k)])), p);
    for (int64_t c = 0; c < lt.channels; ++c) a_t[k] += std::pow(std::abs(st * static_cast<double>(t[index(lt, c, k)])), p);
  }
  PairSums m;
  for (int64_t k = 0; k < hw; ++k) m.add({a_s[k] * a_s[k], a_t[k] * a_t[k], a_s[k] * a_t[k], (a_s[k] - a_t[k]) * (a_s[k] - a_t[k])});
  const PairResult r =
      normalized_pair(m.xx, m.yy, m.xy, m.dd, kNormEps * std::pow(ss, p), kNormEps * std::pow(st, p)).scaled(weight);
  loss = r.loss;
  for (int64_t k = 0; k < hw; ++k) {  // d loss / dF = s · d loss / d(sF)
    const double g_s = r.ax * a_s[k] + r.bx * a_t[k], g_t = r.ay * a_t[k] + r.by * a_s[k];
    if (gs)
      for (int64_t c = 0; c < ls.channels; ++c) {
        const int64_t j = index(ls, c, k);
        gs[j] = static_cast<scalar_t>(ss * g_s * d_abs_pow(ss * static_cast<double>(s[j]), p));
      }
    if (gt)
      for (int64_t c = 0; c < lt.channels; ++c) {
        const int64_t j = index(lt, c, k);
        gt[j] = static_cast<scalar_t>(st * g_t * d_abs_pow(st * static_cast<double>(t[j]), p));
      }
  }
  return true;
}

// ---- the modes ----

// What the kernels write: the per-sample losses (in double) and the gradients (null when not asked for),
// each scaled by `weight` (1/N for the mean).
template <typename scalar_t>
struct Outputs {
  std::vector<double>& losses;
  scalar_t* grad_s;
  scalar_t* grad_t;
  double weight;
};

// Modes "mse" and "normalized": sample i is the flat block [i * len, (i + 1) * len) of both tensors.
template <typename scalar_t>
void flat_fused(const at::Tensor& student, const at::Tensor& teacher, int64_t mode, Outputs<scalar_t> out) {
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t len = student.numel() / n;
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  const int64_t chunks = std::max<int64_t>(1, (len + kFlatChunk - 1) / kFlatChunk);
  std::vector<PairSums> partial(n * chunks);  // mode mse uses .dd only
  std::vector<PairResult> coeffs(n);
  std::vector<char> rescaled(n, 0);  // the rescaled path has written this sample's gradients already
  const bool grads = out.grad_s || out.grad_t;

  const auto stats = [&](int64_t i, int64_t c) {
    const int64_t b = c * kFlatChunk, e = std::min(len, b + kFlatChunk), off = i * len + b;
    if (mode == kMse) {
      partial[i * chunks + c].dd = mse_sum(s + off, t + off, e - b);
    } else {
      partial[i * chunks + c] = pair_sums(s + off, t + off, e - b);
    }
  };
  const auto finish = [&](int64_t i) {
    PairSums m;
    for (int64_t c = 0; c < chunks; ++c) m.add(partial[i * chunks + c]);
    scalar_t* gs = out.grad_s ? out.grad_s + i * len : nullptr;
    scalar_t* gt = out.grad_t ? out.grad_t + i * len : nullptr;
    if (!m.finite()) {
      rescaled[i] = mode == kMse ? mse_rescaled(s + i * len, t + i * len, len, out.weight, out.losses[i], gs, gt)
                                 : normalized_rescaled(s + i * len, t + i * len, len, out.weight, out.losses[i], gs, gt);
      if (rescaled[i]) return;
    }
    if (mode == kMse) {
      out.losses[i] = m.dd / static_cast<double>(len);  // len == 0 gives NaN, as torch.mean
      const double a = 2.0 * out.weight / static_cast<double>(len);
      coeffs[i] = {0, a, -a, a, -a};
    } else {
      const PairResult r = normalized_pair(m.xx, m.yy, m.xy, m.dd, kNormEps, kNormEps);
      out.losses[i] = r.loss;
      coeffs[i] = r.scaled(out.weight);
    }
  };
  const auto grad = [&](int64_t i, int64_t c) {
    if (!grads || rescaled[i]) return;
    const int64_t b = c * kFlatChunk, e = std::min(len, b + kFlatChunk), off = i * len + b;
    scalar_t* gs = out.grad_s ? out.grad_s + off : nullptr;
    scalar_t* gt = out.grad_t ? out.grad_t + off : nullptr;
    if (mode == kMse) {  // bx = −ax and by = −ay: the gradients are multiples of s − t
      mse_grads(s + off, t + off, e - b, static_cast<acc_t<scalar_t>>(coeffs[i].ax), gs, gt);
    } else {
      pair_grads(s + off, t + off, e - b, coeffs[i], gs, gt);
    }
  };
  per_sample(n, chunks, 2 * std::min(len, kFlatChunk), stats, finish, grad);
}

// Mode "attention": the maps of one chunk of hw are built into `maps` (both maps of every sample), reduced to
// pair sums, and reused by the gradient walk.
template <int kPow, typename scalar_t>
void attention_fused(const at::Tensor& student, const at::Tensor& teacher, double p, Outputs<scalar_t> out) {
  using acc = acc_t<scalar_t>;
  const int64_t n = student.size(0);
  if (n == 0) return;
  const int64_t hw = student.size(2) * student.size(3);
  const MapLayout ls = map_layout(student), lt = map_layout(teacher);
  const scalar_t* s = student.const_data_ptr<scalar_t>();
  const scalar_t* t = teacher.const_data_ptr<scalar_t>();
  const acc pa = static_cast<acc>(p);
  const int64_t channels = std::max<int64_t>(1, ls.channels + lt.channels);
  const int64_t chunk = attention_chunk(channels);
  const int64_t chunks = std::max<int64_t>(1, (hw + chunk - 1) / chunk);
  std::vector<acc> maps(2 * n * hw);  // a_s of sample i at [2 i hw, (2 i + 1) hw), then its a_t
  std::vector<PairSums> partial(n * chunks);
  std::vector<PairResult> coeffs(n);
  std::vector<char> rescaled(n, 0);
  const bool grads = out.grad_s || out.grad_t;

  const auto stats = [&](int64_t i, int64_t c) {
    const int64_t b = c * chunk, e = std::min(hw, b + chunk);
    acc* a_s = maps.data() + 2 * i * hw + b;
    acc* a_t = a_s + hw;
    attention_map_chunk<kPow>(s + i * ls.sample_stride, ls, b, e, pa, a_s);
    attention_map_chunk<kPow>(t + i * lt.sample_stride, lt, b, e, pa, a_t);
    partial[i * chunks + c] = pair_sums(a_s, a_t, e - b);
  };
  const auto finish = [&](int64_t i) {
    PairSums m;
    for (int64_t c = 0; c < chunks; ++c) m.add(partial[i * chunks + c]);
    if (!m.finite()) {
      rescaled[i] = attention_rescaled(s + i * ls.sample_stride, ls, t + i * lt.sample_stride, lt, hw, p, out.weight,
                                       out.losses[i], out.grad_s ? out.grad_s + i * ls.sample_stride : nullptr,
                                       out.grad_t ? out.grad_t + i * lt.sample_stride : nullptr);
      if (rescaled[i]) return;
    }
    const PairResult r = normalized_pair(m.xx, m.yy, m.xy, m.dd, kNormEps, kNormEps);
    out.losses[i] = r.loss;
    coeffs[i] = r.scaled(out.weight);
  };
  const auto grad = [&](int64_t i, int64_t c) {
    if (!grads || rescaled[i]) return;
    const int64_t b = c * chunk, e = std::min(hw, b + chunk), len = e - b;
    const acc* a_s = maps.data() + 2 * i * hw + b;
    std::vector<acc> d_maps(2 * len);  // d loss / d a_s and d loss / d a_t over the chunk
    pair_grads(a_s, a_s + hw, len, coeffs[i], d_maps.data(), d_maps.data() + len);
    if (out.grad_s)
      attention_grad_chunk<kPow>(s + i * ls.sample_stride, ls, b, e, pa, d_maps.data(), out.grad_s + i * ls.sample_stride);
    if (out.grad_t)
      attention_grad_chunk<kPow>(t + i * lt.sample_stride, lt, b, e, pa, d_maps.data() + len,
                                 out.grad_t + i * lt.sample_stride);
  };
  per_sample(n, chunks, chunk * channels, stats, finish, grad);
}

// The loss as `reduction` asks, from the per-sample losses: (N,) for none, 0-d otherwise (the mean of no
// samples is NaN, as torch.mean).
at::Tensor reduce_losses(const std::vector<double>& losses, int64_t reduction, const at::TensorOptions& options) {
  const int64_t n = static_cast<int64_t>(losses.size());
  if (reduction == kReduceNone) {
    at::Tensor out = at::empty({n}, options);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "reduce_losses", [&] {
      std::copy(losses.begin(), losses.end(), out.mutable_data_ptr<scalar_t>());
    });
    return out;
  }
  double sum = 0;
  for (double v : losses) sum += v;
  if (reduction == kReduceMean) sum = n ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
  return at::scalar_tensor(sum, options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cpu(const at::Tensor& student,
                                                                       const at::Tensor& teacher, int64_t mode,
                                                                       double p, int64_t reduction, bool grad_student,
                                                                       bool grad_teacher) {
  check_feature_distance_inputs("feature_distance_fwd", student, teacher, mode, p, reduction, c10::DeviceType::CPU);
  const int64_t n = student.size(0);
  // Each gradient has its input's strides (contiguous or channels_last): the kernels write it in its input's
  // element order.
  at::Tensor grad_s = grad_student ? gradient_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? gradient_like(teacher) : at::empty({0}, teacher.options());
  TORCH_INTERNAL_ASSERT(!grad_student || grad_s.strides() == student.strides());
  TORCH_INTERNAL_ASSERT(!grad_teacher || grad_t.strides() == teacher.strides());
  std::vector<double> losses(n);
  const double weight = sample_weight(reduction, n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_fwd_cpu", [&] {
    const Outputs<scalar_t> out{losses, grad_student ? grad_s.mutable_data_ptr<scalar_t>() : nullptr,
                                grad_teacher ? grad_t.mutable_data_ptr<scalar_t>() : nullptr, weight};
    if (mode != kAttention) {
      flat_fused<scalar_t>(student, teacher, mode, out);
    } else if (p == 2.0) {
      attention_fused<kPowTwo, scalar_t>(student, teacher, p, out);
    } else if (p == 1.0) {
      attention_fused<kPowOne, scalar_t>(student, teacher, p, out);
    } else {
      attention_fused<kPowGeneral, scalar_t>(student, teacher, p, out);
    }
  });
  return {reduce_losses(losses, reduction, student.options().dtype(accumulate_dtype(student))), grad_s, grad_t};
}

TORCH_LIBRARY_IMPL(rkd_fast, CPU, m) {
  m.impl("feature_distance_fwd", &feature_distance_fwd_cpu);
}

}  // namespace rkd_fast
