// rkd_fast::feature_distance_fwd on CUDA: the reduced loss and, for each input whose flag is set, the gradient of
// that loss, in one launch that reads each input once.
//
// Grid (sample, chunk). Each block reduces its chunk to partial sums (modes 1, 2: Σx², Σy², Σxy, Σ(x−y)² and
// max|x|, max|y|; mode 0: Σ(x−y)² and max|x−y|) and thread 0 stores them. The block that arrives last at its
// sample (an atomic counter, as in CUDA's threadFenceReduction sample: no block ever waits for another, so none
// can deadlock whatever the occupancy) adds the sample's partials in chunk order (so results are deterministic),
// forms the loss and the gradient coefficients in double, and writes the sample's gradient in a second walk over
// the sample, which the other blocks of the sample have just read: while it is in L2. Per sample the gradient is
// linear in the inputs: d loss/d x = ax·x + bx·y, d loss/d y = ay·y + by·x (mode 0: multiples of x − y).
//
// Mode 2 ("attention"): the chunks are tiles of 32 H·W positions; each block builds the maps
// a[hw] = Σ_c |F[c, hw]|^p of its tile for student and teacher, each through its own strides (contiguous: lanes
// over the 32 positions, warps over channels; channels_last: a warp per position, lanes over its contiguous
// channels), into a scratch (N, 2, H·W) buffer; the last block reads them back for dL/da, chained into
// dL/dF = dL/da · p|F|^(p−1) sign(F) (0 at F = 0 for every p).
//
// Large values: sums that are not finite while max|x| is means the squares overflowed; the last block then redoes
// the sample on x/max|x| (the distances are scale-invariant with the norm floor scaled too, and the gradients
// scale back), as csrc/cpu does.
//
// Accumulation is in fp32 for float/half/bfloat16 and fp64 for double. Flat loads are 16-byte vectors when every
// sample and chunk starts aligned.
//
// Only c10/cuda headers are used (the stream is c10::cuda::getCurrentCUDAStream, which
// at::cuda::getCurrentCUDAStream names too; device attributes come from cudaDeviceGetAttribute):
// ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE/cuSOLVER headers, which a minimal CUDA toolkit
// (nvcc and the runtime only) does not ship.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "kernels.h"
#include "normalized_pair.h"

namespace rkd_fast {
namespace {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // H·W positions per block in mode attention
constexpr double kNormEps = 1e-12;  // floor of ‖x‖, as in torch.nn.functional.normalize
constexpr int kMaxChunks = 1024;     // per sample: keeps the partials small and the last block's sum short
constexpr int kMaxGridY = 65535;
constexpr int kPartials = 6;  // per (sample, chunk): four sums and two largest magnitudes

enum PowKind : int { kPowAny = 0, kPowOne = 1, kPowTwo = 2 };

template <typename scalar_t>
using acc_type = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for float/half/bfloat16, double for double

template <typename T, int kSize>
struct alignas(sizeof(T) * kSize) Vec {
  T v[kSize];
};

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));  // one 16-byte load
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Sums the first kSums of v over the block and takes the max of the rest; the results are valid in thread 0.
// The order of the additions is fixed, so results are deterministic.
template <int kSums, typename T, int K>
__device__ __forceinline__ void block_reduce(T (&v)[K]) {
  __shared__ T shared[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = k < kSums ? warp_sum(v[k]) : warp_max(v[k]);
    if (lane == 0) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const T w = lane < kWarps ? shared[k][lane] : T(0);
      v[k] = k < kSums ? warp_sum(w) : warp_max(w);
    }
  }
  __syncthreads();  // `shared` may be reused by the next call
}

// Broadcasts thread 0's value to the block.
template <typename T>
__device__ __forceinline__ T broadcast(T v) {
  __shared__ T value;
  if (threadIdx.x == 0) value = v;
  __syncthreads();
  const T out = value;
  __syncthreads();
  return out;
}

__device__ __forceinline__ bool finite(double v) { return isfinite(v); }

// The scale that brings the largest magnitude to 1 (1 for all zeros).
__device__ __forceinline__ double inverse(double largest) { return largest > 0 ? 1.0 / largest : 1.0; }

// True in the block that completes sample n (every block of the sample has stored its partials by then, and the
// fence makes them visible to it).
__device__ __forceinline__ bool arrived_last(int* counts, int64_t n, int n_chunks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counts + n, 1) == n_chunks - 1;
  __syncthreads();
  return last;
}

// The sample's partials added in chunk order (each thread a strided subset, then a fixed tree): in thread 0,
// {Σ0, Σ1, Σ2, Σ3, max4, max5}. __ldcg: written by other blocks, so read past this SM's L1.
template <typename acc_t>
__device__ void sample_partials(const acc_t* row, int n_chunks, acc_t (&s)[kPartials]) {
  for (int k = 0; k < kPartials; ++k) s[k] = acc_t(0);
  for (int c = threadIdx.x; c < n_chunks; c += kThreads) {
    for (int k = 0; k < 4; ++k) s[k] += __ldcg(row + c * kPartials + k);
    s[4] = fmax(s[4], __ldcg(row + c * kPartials + 4));
    s[5] = fmax(s[5], __ldcg(row + c * kPartials + 5));
  }
  block_reduce<4>(s);
}

// In the last block of a sample: its partials added up (thread 0: sums in s[0..3], largest magnitudes in s[4],
// s[5]), and the two inputs' scales for every thread: 1, or 1/max|·| when the sums overflowed while the inputs
// are finite (the caller then recomputes the sums on the scaled inputs). Returns whether they overflowed.
template <typename acc_t>
__device__ bool sample_scales(const acc_t* row, int n_chunks, acc_t (&s)[kPartials], acc_t& scale_x,
                              acc_t& scale_y) {
  sample_partials(row, n_chunks, s);
  const bool overflowed = threadIdx.x == 0 && !(finite(s[0]) && finite(s[1]) && finite(s[2]) && finite(s[3])) &&
                          finite(s[4]) && finite(s[5]);
  scale_x = broadcast(acc_t(overflowed ? inverse(s[4]) : 1.0));
  scale_y = broadcast(acc_t(overflowed ? inverse(s[5]) : 1.0));
  return broadcast(overflowed);
}

// Thread 0 of every block of (n, c) stores its partials.
template <typename acc_t>
__device__ __forceinline__ void store_partials(acc_t* partials, int64_t n, int c, int n_chunks,
                                               const acc_t (&s)[kPartials]) {
  if (threadIdx.x != 0) return;
  acc_t* out = partials + (n * n_chunks + c) * kPartials;
  for (int k = 0; k < kPartials; ++k) out[k] = s[k];
}

// ---- modes 0 and 1: sample n is the flat block [n * D, (n + 1) * D) of x and y ----

template <int kMode, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t x, acc_t y, acc_t (&s)[kPartials]) {
  const acc_t d = x - y;
  s[3] += d * d;
  if (kMode == kMse) {
    s[4] = fmax(s[4], fabs(d));
  } else {
    s[0] += x * x;
    s[1] += y * y;
    s[2] += x * y;
    s[4] = fmax(s[4], fabs(x));
    s[5] = fmax(s[5], fabs(y));
  }
}

// fn(x[i], y[i]) for every i of [begin, end) this thread owns, read as 16-byte vectors when `vectorized` (begin,
// end − begin and both pointers aligned to the vector).
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_pairs(const scalar_t* x, const scalar_t* y, int64_t begin, int64_t end,
                                          bool vectorized, const F& fn) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  if (vectorized) {
    for (int64_t i = begin + threadIdx.x * V; i < end; i += int64_t(kThreads) * V) {
      const auto xv = *reinterpret_cast<const Vec<scalar_t, V>*>(x + i);
      const auto yv = *reinterpret_cast<const Vec<scalar_t, V>*>(y + i);
#pragma unroll
      for (int k = 0; k < V; ++k) fn(acc_t(xv.v[k]), acc_t(yv.v[k]));
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) fn(acc_t(x[i]), acc_t(y[i]));
  }
}

// (gx[i], gy[i]) = grads(x[i], y[i]) over [0, D) of one sample (either output may be null), as 16-byte vectors
// when `vectorized`.
template <typename scalar_t, typename F>
__device__ __forceinline__ void write_grads(const scalar_t* x, const scalar_t* y, scalar_t* gx, scalar_t* gy,
                                            int64_t D, bool vectorized, const F& grads) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  if (vectorized) {
    for (int64_t i = threadIdx.x * V; i < D; i += int64_t(kThreads) * V) {
      const auto xv = *reinterpret_cast<const Vec<scalar_t, V>*>(x + i);
      const auto yv = *reinterpret_cast<const Vec<scalar_t, V>*>(y + i);
      Vec<scalar_t, V> gxv, gyv;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t a, b;
        grads(acc_t(xv.v[k]), acc_t(yv.v[k]), a, b);
        gxv.v[k] = static_cast<scalar_t>(a);
        gyv.v[k] = static_cast<scalar_t>(b);
      }
      if (gx) *reinterpret_cast<Vec<scalar_t, V>*>(gx + i) = gxv;
      if (gy) *reinterpret_cast<Vec<scalar_t, V>*>(gy + i) = gyv;
    }
  } else {
    for (int64_t i = threadIdx.x; i < D; i += kThreads) {
      acc_t a, b;
      grads(acc_t(x[i]), acc_t(y[i]), a, b);
      if (gx) gx[i] = static_cast<scalar_t>(a);
      if (gy) gy[i] = static_cast<scalar_t>(b);
    }
  }
}

template <int kMode, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    flat_fused_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, scalar_t* __restrict__ grad_x,
                      scalar_t* __restrict__ grad_y, acc_type<scalar_t>* __restrict__ partials, int* __restrict__ counts,
                      acc_type<scalar_t>* __restrict__ losses, int64_t D, int64_t chunk, int n_chunks, double weight,
                      bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const int c = blockIdx.y;
  const scalar_t* xs = x + n * D;
  const scalar_t* ys = y + n * D;
  const int64_t begin = c * chunk, end = begin + chunk < D ? begin + chunk : D;
  acc_t s[kPartials] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for_pairs(xs, ys, begin, end, vectorized, [&](acc_t xv, acc_t yv) { accumulate<kMode>(xv, yv, s); });
  block_reduce<4>(s);
  store_partials(partials, n, c, n_chunks, s);
  if (!arrived_last(counts, n, n_chunks)) return;

  // ---- the last block of sample n: its loss and its gradient ----
  acc_t sx, sy;  // the scales of x and y (mode 0: of x − y)
  if (sample_scales(partials + n * n_chunks * kPartials, n_chunks, s, sx, sy)) {  // the sums again, scaled
    acc_t r[kPartials] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for_pairs(xs, ys, 0, D, vectorized, [&](acc_t xv, acc_t yv) {
      if (kMode == kMse) accumulate<kMode>((xv - yv) * sx, acc_t(0), r);
      else accumulate<kMode>(xv * sx, yv * sy, r);
    });
    block_reduce<4>(r);
    for (int k = 0; k < 4; ++k) s[k] = r[k];
  }
  // the loss and the coefficients (times the sample's weight in the reduced loss), in thread 0, in double
  PairResult coef{};
  if (threadIdx.x == 0) {
    if (kMode == kMse) {
      const double largest = 1.0 / double(sx);  // mean((d·sx)²)/sx², with no square that overflows
      losses[n] = static_cast<acc_t>(D > 0 ? double(s[3]) / double(D) * largest * largest : NAN);  // mean of none
      const double a = 2.0 * weight / double(D);
      coef = {0, a, -a, a, -a};
    } else {
      const PairResult r = normalized_pair(s[0], s[1], s[2], s[3], kNormEps * double(sx), kNormEps * double(sy));
      losses[n] = static_cast<acc_t>(r.loss);
      coef = r.scaled(weight);
    }
  }
  if (grad_x == nullptr && grad_y == nullptr) return;
  const acc_t ax = broadcast(acc_t(coef.ax)), bx = broadcast(acc_t(coef.bx));
  const acc_t ay = broadcast(acc_t(coef.ay)), by = broadcast(acc_t(coef.by));
  scalar_t* gxs = grad_x ? grad_x + n * D : nullptr;
  scalar_t* gys = grad_y ? grad_y + n * D : nullptr;
  const bool scaled = kMode != kMse && (sx != acc_t(1) || sy != acc_t(1));
  // the whole sample, as vectors when its chunks were (vectorized implies D and both bases aligned)
  write_grads(xs, ys, gxs, gys, D, vectorized, [&](acc_t xv, acc_t yv, acc_t& gx, acc_t& gy) {
    if (kMode == kMse) {  // the difference first: exact when x and y are close
      const acc_t d = xv - yv;
      gx = d * ax;
      gy = d * by;
    } else if (scaled) {  // d loss / dx = sx · d loss / d(sx x)
      xv *= sx;
      yv *= sy;
      gx = (ax * xv + bx * yv) * sx;
      gy = (ay * yv + by * xv) * sy;
    } else {
      gx = ax * xv + bx * yv;
      gy = ay * yv + by * xv;
    }
  });
}

// ---- mode 2: the attention maps and their chain rule ----

// powf for float (not a promotion to double pow), pow for double
__device__ __forceinline__ float power(float a, float p) { return powf(a, p); }
__device__ __forceinline__ double power(double a, double p) { return pow(a, p); }

template <typename acc_t>
__device__ __forceinline__ acc_t abs_pow(acc_t v, acc_t p, int pow_kind) {
  if (pow_kind == kPowTwo) return v * v;
  const acc_t a = fabs(v);
  if (pow_kind == kPowOne) return a;
  return a == acc_t(0) ? acc_t(0) : power(a, p);  // NaN != 0: NaN propagates
}

// d|v|^p / dv = p |v|^(p−1) sign(v), and 0 at v = 0 for every p: for p < 1 |v|^p has no derivative there, and 0,
// the subgradient, keeps ReLU features (exact zeros) from giving p · inf · 0 = NaN. NaN stays NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t abs_pow_grad(acc_t v, acc_t p, int pow_kind) {
  if (pow_kind == kPowTwo) return acc_t(2) * v;
  if (v != v) return v;
  const acc_t sign = v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
  if (pow_kind == kPowOne || v == acc_t(0)) return sign;
  return p * power(fabs(v), p - acc_t(1)) * sign;
}

// Element (c, hw) of a sample is at c * stride_c + hw * stride_hw; channels_last (stride_c == 1, stride_hw != 1)
// is walked a warp per position, anything else (contiguous) a lane per position.
struct MapLayout {
  int64_t channels, stride_n, stride_c, stride_hw;
  __host__ __device__ bool channels_last() const { return stride_hw != 1 && stride_c == 1; }
};

// a[j] = Σ_c |scale · F[c, h0 + j]|^p for the tile's kTile positions (0 past hw), into shared `a`; returns this
// thread's largest |F| seen. Ends with a barrier, so `a` is complete for every thread.
template <typename scalar_t>
__device__ acc_type<scalar_t> map_tile(const scalar_t* f, const MapLayout& l, int64_t h0, int64_t hw,
                                       acc_type<scalar_t> scale, acc_type<scalar_t> p, int pow_kind,
                                       acc_type<scalar_t>* a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t part[kWarps][kTile];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t largest = 0;
  if (l.channels_last()) {  // warp w takes positions w, w + 8, ...; lanes over the contiguous channels
    for (int j = warp; j < kTile; j += kWarps) {
      acc_t sum = 0;
      if (h0 + j < hw) {
        const scalar_t* col = f + (h0 + j) * l.stride_hw;
        for (int64_t c = lane; c < l.channels; c += 32) {
          const acc_t v = acc_t(col[c * l.stride_c]);
          sum += abs_pow(v * scale, p, pow_kind);
          largest = fmax(largest, fabs(v));
        }
      }
      sum = warp_sum(sum);
      if (lane == 0) a[j] = sum;
    }
  } else {  // lane j takes position h0 + j; the warps interleave the channels, then add across warps
    acc_t sum = 0;
    if (h0 + lane < hw) {
      const scalar_t* row = f + (h0 + lane) * l.stride_hw;
      for (int64_t c = warp; c < l.channels; c += kWarps) {
        const acc_t v = acc_t(row[c * l.stride_c]);
        sum += abs_pow(v * scale, p, pow_kind);
        largest = fmax(largest, fabs(v));
      }
    }
    part[warp][lane] = sum;
    __syncthreads();
    if (warp == 0) {
      acc_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += part[w][lane];
      a[lane] = total;
    }
  }
  __syncthreads();
  return largest;
}

// grad[c, h0 + j] = scale · g[j] · d|F'|^p/dF' at F' = scale · F[c, h0 + j], for the tile; grad has its own
// strides (those of empty_like(F): the same walk writes it in order).
template <typename scalar_t>
__device__ void grad_tile(const scalar_t* f, const MapLayout& l, scalar_t* grad, int64_t g_stride_c,
                          int64_t g_stride_hw, int64_t h0, int64_t hw, const acc_type<scalar_t>* g,
                          acc_type<scalar_t> scale, acc_type<scalar_t> p, int pow_kind) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto write = [&](int64_t c, int j) {
    const acc_t v = acc_t(f[c * l.stride_c + (h0 + j) * l.stride_hw]);
    grad[c * g_stride_c + (h0 + j) * g_stride_hw] = static_cast<scalar_t>(g[j] * abs_pow_grad(v * scale, p, pow_kind) * scale);
  };
  if (l.channels_last()) {
    for (int j = warp; j < kTile && h0 + j < hw; j += kWarps)
      for (int64_t c = lane; c < l.channels; c += 32) write(c, j);
  } else if (h0 + lane < hw) {
    for (int64_t c = warp; c < l.channels; c += kWarps) write(c, lane);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    attention_fused_kernel(const scalar_t* __restrict__ s, MapLayout ls, const scalar_t* __restrict__ t, MapLayout lt,
                           scalar_t* __restrict__ grad_s, MapLayout gls, scalar_t* __restrict__ grad_t, MapLayout glt,
                           acc_type<scalar_t>* __restrict__ maps, acc_type<scalar_t>* __restrict__ partials,
                           int* __restrict__ counts, acc_type<scalar_t>* __restrict__ losses, int64_t hw,
                           int n_chunks, acc_type<scalar_t> p, int pow_kind, double weight) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t a_s[kTile], a_t[kTile];
  const int64_t n = blockIdx.x;
  const int c = blockIdx.y;
  const scalar_t* ss = s + n * ls.stride_n;
  const scalar_t* ts = t + n * lt.stride_n;
  acc_t* map_s = maps + n * 2 * hw;  // the student's map of sample n, then the teacher's
  acc_t* map_t = map_s + hw;
  const int64_t h0 = int64_t(c) * kTile;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  acc_t st[kPartials] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  st[4] = map_tile(ss, ls, h0, hw, acc_t(1), p, pow_kind, a_s);
  st[5] = map_tile(ts, lt, h0, hw, acc_t(1), p, pow_kind, a_t);
  if (warp == 0) {
    const acc_t x = a_s[lane], y = a_t[lane];
    if (h0 + lane < hw) {
      map_s[h0 + lane] = x;
      map_t[h0 + lane] = y;
    }
    st[0] = x * x;  // 0 past hw
    st[1] = y * y;
    st[2] = x * y;
    st[3] = (x - y) * (x - y);
  }
  block_reduce<4>(st);
  store_partials(partials, n, c, n_chunks, st);
  if (!arrived_last(counts, n, n_chunks)) return;

  // ---- the last block of sample n: its loss and its gradient ----
  acc_t scale_s, scale_t;
  if (sample_scales(partials + n * n_chunks * kPartials, n_chunks, st, scale_s, scale_t)) {  // maps of F/max|F|
    acc_t r[kPartials] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t h = 0; h < hw; h += kTile) {
      map_tile(ss, ls, h, hw, scale_s, p, pow_kind, a_s);
      map_tile(ts, lt, h, hw, scale_t, p, pow_kind, a_t);
      if (warp == 0 && h + lane < hw) {
        const acc_t x = a_s[lane], y = a_t[lane];
        map_s[h + lane] = x;
        map_t[h + lane] = y;
        r[0] += x * x;
        r[1] += y * y;
        r[2] += x * y;
        r[3] += (x - y) * (x - y);
      }
      __syncthreads();  // a_s, a_t are reused by the next tile
    }
    block_reduce<4>(r);
    for (int k = 0; k < 4; ++k) st[k] = r[k];
  }
  PairResult coef{};
  if (threadIdx.x == 0) {  // the maps scale by scale^p, and so do their norm floors
    const PairResult r = normalized_pair(st[0], st[1], st[2], st[3], kNormEps * pow(double(scale_s), double(p)),
                                         kNormEps * pow(double(scale_t), double(p)));
    losses[n] = static_cast<acc_t>(r.loss);
    coef = r.scaled(weight);
  }
  if (grad_s == nullptr && grad_t == nullptr) return;
  const acc_t ax = broadcast(acc_t(coef.ax)), bx = broadcast(acc_t(coef.bx));
  const acc_t ay = broadcast(acc_t(coef.ay)), by = broadcast(acc_t(coef.by));
  __shared__ acc_t g_s[kTile], g_t[kTile];
  for (int64_t h = 0; h < hw; h += kTile) {
    if (warp == 0) {  // dL/da over the tile, from the maps (written by other blocks: past L1)
      const acc_t x = h + lane < hw ? __ldcg(map_s + h + lane) : acc_t(0);
      const acc_t y = h + lane < hw ? __ldcg(map_t + h + lane) : acc_t(0);
      g_s[lane] = ax * x + bx * y;
      g_t[lane] = ay * y + by * x;
    }
    __syncthreads();
    if (grad_s) grad_tile(ss, ls, grad_s + n * gls.stride_n, gls.stride_c, gls.stride_hw, h, hw, g_s, scale_s, p, pow_kind);
    if (grad_t) grad_tile(ts, lt, grad_t + n * glt.stride_n, glt.stride_c, glt.stride_hw, h, hw, g_t, scale_t, p, pow_kind);
    __syncthreads();  // g_s, g_t are reused by the next tile
  }
}

// ---- host side ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A size-1 dim may carry any stride: hw = h*W + w steps by W's stride unless W == 1.
int64_t hw_stride(const at::Tensor& x) { return x.size(3) > 1 ? x.stride(3) : x.stride(2); }

MapLayout map_layout(const at::Tensor& x) { return {x.size(1), x.stride(0), x.stride(1), hw_stride(x)}; }

struct Launch {
  int64_t chunk;
  int n_chunks;
};

// Chunks per sample: enough blocks to fill the GPU (8 per SM) when the batch alone does not, each thread
// doing at least 4 vector loads per chunk; chunk a multiple of the block's vector stride.
Launch chunking(int64_t size, int64_t rows, int device, int vec) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t step = int64_t(kThreads) * vec;
  const int64_t wanted = ceil_div(int64_t(sm_count) * 8, std::max<int64_t>(rows, 1));
  const int64_t most = ceil_div(std::max<int64_t>(size, 1), step * 4);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>({wanted, most, kMaxChunks}));
  const int64_t chunk = ceil_div(ceil_div(std::max<int64_t>(size, 1), n_chunks), step) * step;
  return {chunk, static_cast<int>(ceil_div(std::max<int64_t>(size, 1), chunk))};
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte vector loads need every sample and chunk start aligned, and every pointer.
template <typename scalar_t>
bool can_vectorize(int64_t size, const Launch& launch, std::initializer_list<const void*> pointers) {
  constexpr int V = vec_size<scalar_t>();
  if (size % V != 0 || launch.chunk % V != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned(p)) return false;
  }
  return true;
}

int pow_kind_of(double p) { return p == 2.0 ? kPowTwo : (p == 1.0 ? kPowOne : kPowAny); }

// The per-sample losses reduced as `reduction` says (the mean of no samples is NaN, as torch.mean).
at::Tensor reduce_losses(const at::Tensor& losses, int64_t reduction) {
  if (reduction == kReduceNone) return losses;
  return reduction == kReduceMean ? losses.mean() : losses.sum();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                        const at::Tensor& teacher, int64_t mode,
                                                                        double p, int64_t reduction, bool grad_student,
                                                                        bool grad_teacher) {
  check_feature_distance_inputs("feature_distance_fwd", student, teacher, mode, p, reduction, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n = student.size(0);
  const auto acc_options = student.options().dtype(accumulate_dtype(student));
  at::Tensor losses = at::empty({n}, acc_options);
  // empty_like keeps the input's strides (contiguous or channels_last), as the Python fake does
  at::Tensor grad_s = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (n == 0) return {reduce_losses(losses, reduction), grad_s, grad_t};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = student.get_device();
  const double weight = sample_weight(reduction, n);
  at::Tensor counts = at::zeros({n}, student.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    scalar_t* gs = grad_student ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = grad_teacher ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    if (mode != kAttention) {
      // modes 0, 1: sample i is the flat block [i * D, (i + 1) * D) of both tensors, in the same order
      const int64_t size = student.numel() / n;
      const Launch launch = chunking(size, n, device, vec_size<scalar_t>());
      at::Tensor partials = at::empty({n, launch.n_chunks, kPartials}, acc_options);
      const scalar_t* x = student.const_data_ptr<scalar_t>();
      const scalar_t* y = teacher.const_data_ptr<scalar_t>();
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(launch.n_chunks));
      const auto kernel = mode == kMse ? flat_fused_kernel<kMse, scalar_t> : flat_fused_kernel<kNormalized, scalar_t>;
      kernel<<<grid, kThreads, 0, stream>>>(x, y, gs, gt, partials.mutable_data_ptr<acc_t>(),
                                            counts.mutable_data_ptr<int>(), losses.mutable_data_ptr<acc_t>(), size,
                                            launch.chunk, launch.n_chunks, weight,
                                            can_vectorize<scalar_t>(size, launch, {x, y, gs, gt}));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t hw = student.size(2) * student.size(3);
    const int n_chunks = static_cast<int>(std::max<int64_t>(1, ceil_div(hw, kTile)));
    TORCH_CHECK(n_chunks <= kMaxGridY, "feature_distance_fwd: H·W = ", hw, " is more than this kernel's ",
                int64_t(kMaxGridY) * kTile, " positions");
    at::Tensor partials = at::empty({n, n_chunks, kPartials}, acc_options);
    at::Tensor maps = at::empty({n, 2, hw}, acc_options);
    const MapLayout no_grad{0, 0, 0, 1};
    const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n_chunks));
    attention_fused_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        student.const_data_ptr<scalar_t>(), map_layout(student), teacher.const_data_ptr<scalar_t>(),
        map_layout(teacher), gs, gs ? map_layout(grad_s) : no_grad, gt, gt ? map_layout(grad_t) : no_grad,
        maps.mutable_data_ptr<acc_t>(), partials.mutable_data_ptr<acc_t>(), counts.mutable_data_ptr<int>(),
        losses.mutable_data_ptr<acc_t>(), hw, n_chunks, static_cast<acc_t>(p), pow_kind_of(p), weight);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {reduce_losses(losses, reduction), grad_s, grad_t};
}

TORCH_LIBRARY_IMPL(rkd_fast, CUDA, m) {
  m.impl("feature_distance_fwd", &feature_distance_fwd_cuda);
}

}  // namespace rkd_fast
