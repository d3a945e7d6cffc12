// rkd_fast::feature_distance_fwd on CUDA: per-sample loss and, when asked, d loss_i / d input_i.
//
// Per sample the loss and both gradients depend on the data only through a few sums, so the op runs as:
//   1. pair_partials_kernel, grid (sample, chunk): each block reduces one chunk of one sample to partial sums
//      (mode 0: Σ(x−y)²; modes 1 and 2: Σx², Σy², Σxy) with warp shuffles and a block reduction, written to a
//      (N, chunks, 3) buffer. No atomics: the order of the sums is fixed, so results are deterministic.
//   2. finalize_kernel, one warp per sample: adds the sample's partials (in double), writes its loss and the
//      coefficients the gradient needs: coef[n] = (1/‖x‖, 1/‖y‖, x̂·r, ŷ·(−r)) with r = 2(x̂ − ŷ).
//   3. only when a gradient is asked for: pair_grad_kernel (or attention_grad_kernel), grid (sample, chunk),
//      reads the sample again and writes the gradients.
// Mode 2 ("attention") first builds the maps a[n, hw] = Σ_c |F[c, hw]|^p of student and teacher into an fp32
// (fp64 for fp64) scratch (2, N, H·W) with attention_map_kernel, each tensor through its own strides
// (contiguous: lanes over 32 consecutive hw positions, warps over channels; channels_last: a warp per hw
// position, lanes over its contiguous channels); steps 1 and 2 run on the two maps; attention_grad_kernel
// chains dL/da into dL/dF.
//
// When a gradient is needed the samples are processed in groups whose bytes fit in half the L2 cache, steps
// 1-3 launched per group, so that the gradient pass re-reads each sample from L2 rather than from HBM.
// Accumulation is in fp32 for float/half/bfloat16 and fp64 for double. Flat loads are 16-byte vectors when
// every sample and chunk starts aligned.
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
#include <tuple>

#include "kernels.h"

namespace rkd_fast {
namespace {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr double kNormEps = 1e-12;  // floor of ‖x‖, as in torch.nn.functional.normalize
constexpr int kMaxChunks = 1024;     // per sample; keeps the partials small and the finalize loop short
constexpr int kMaxGridY = 65535;

enum Mode : int64_t { kMse = 0, kNormalized = 1, kAttention = 2 };
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

// Sums each of the K values over the block; the totals are valid in thread 0.
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  __shared__ T shared[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < kWarps ? shared[k][lane] : T(0));
  }
}

template <int kMode, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t x, acc_t y, acc_t (&s)[3]) {
  if (kMode == kMse) {
    const acc_t d = x - y;
    s[0] += d * d;
  } else {
    s[0] += x * x;
    s[1] += y * y;
    s[2] += x * y;
  }
}

// ---- step 1: partial sums of one (sample, chunk) ----
// x and y hold one flat block of D elements per sample; the block (blockIdx.x, blockIdx.y) reduces elements
// [c * chunk, min((c + 1) * chunk, D)) of sample blockIdx.x. `vectorized`: D, chunk and both base pointers
// are multiples of the vector width, so every vector load is aligned and in bounds.
template <int kMode, typename scalar_t>
__global__ void __launch_bounds__(kThreads) pair_partials_kernel(const scalar_t* __restrict__ x,
                                                                  const scalar_t* __restrict__ y,
                                                                  acc_type<scalar_t>* __restrict__ partials,
                                                                  int64_t D, int64_t chunk, int n_chunks,
                                                                  bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  const int64_t n = blockIdx.x;
  const int c = blockIdx.y;
  const scalar_t* xs = x + n * D;
  const scalar_t* ys = y + n * D;
  const int64_t begin = c * chunk, end = begin + chunk < D ? begin + chunk : D;
  acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)};
  if (vectorized) {
    for (int64_t i = begin + threadIdx.x * V; i < end; i += int64_t(kThreads) * V) {
      const auto xv = *reinterpret_cast<const Vec<scalar_t, V>*>(xs + i);
      const auto yv = *reinterpret_cast<const Vec<scalar_t, V>*>(ys + i);
#pragma unroll
      for (int k = 0; k < V; ++k) accumulate<kMode>(acc_t(xv.v[k]), acc_t(yv.v[k]), s);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) accumulate<kMode>(acc_t(xs[i]), acc_t(ys[i]), s);
  }
  block_sum(s);
  if (threadIdx.x == 0) {
    acc_t* out = partials + (n * n_chunks + c) * 3;
    out[0] = s[0];
    out[1] = s[1];
    out[2] = s[2];
  }
}

// ---- step 2: a sample's loss and gradient coefficients, one warp per sample ----
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const acc_t* __restrict__ partials, int n_chunks,
                                                             int64_t D, int64_t rows, bool mse,
                                                             acc_t* __restrict__ losses, acc_t* __restrict__ coef) {
  const int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= rows) return;  // the whole warp leaves together
  double s[3] = {0.0, 0.0, 0.0};
  for (int c = lane; c < n_chunks; c += 32) {
    const acc_t* p = partials + (n * n_chunks + c) * 3;
    s[0] += p[0];
    s[1] += p[1];
    s[2] += p[2];
  }
  for (int k = 0; k < 3; ++k) s[k] = warp_sum(s[k]);
  if (lane != 0) return;
  acc_t* k = coef + n * 4;
  if (mse) {
    losses[n] = static_cast<acc_t>(D > 0 ? s[0] / double(D) : NAN);  // the mean of no elements is NaN
    k[0] = static_cast<acc_t>(2.0 / double(D));
    return;
  }
  const double xx = s[0], yy = s[1], xy = s[2];
  const double norm_x = sqrt(xx), norm_y = sqrt(yy);
  // `norm < eps ? eps : norm` keeps a NaN norm NaN, as clamp_min does
  const double inv_x = 1.0 / (norm_x < kNormEps ? kNormEps : norm_x);
  const double inv_y = 1.0 / (norm_y < kNormEps ? kNormEps : norm_y);
  const double xhat_xhat = xx * inv_x * inv_x, yhat_yhat = yy * inv_y * inv_y, xhat_yhat = xy * inv_x * inv_y;
  losses[n] = static_cast<acc_t>(xhat_xhat + yhat_yhat - 2.0 * xhat_yhat);
  k[0] = static_cast<acc_t>(inv_x);
  k[1] = static_cast<acc_t>(inv_y);
  // below the floor the norm is a constant, so the gradient has no projection term
  k[2] = static_cast<acc_t>(norm_x > kNormEps ? 2.0 * (xhat_xhat - xhat_yhat) : 0.0);
  k[3] = static_cast<acc_t>(norm_y > kNormEps ? 2.0 * (yhat_yhat - xhat_yhat) : 0.0);
}

// ---- step 3, modes 0 and 1: d loss / dx and d loss / dy of one (sample, chunk) ----
template <int kMode, typename acc_t>
__device__ __forceinline__ void pair_grad(acc_t x, acc_t y, const acc_t (&k)[4], acc_t& gx, acc_t& gy) {
  if (kMode == kMse) {
    gx = (x - y) * k[0];  // 2(x − y)/D, the difference first so that it stays exact
    gy = -gx;
  } else {
    const acc_t xhat = x * k[0], yhat = y * k[1];
    const acc_t r = acc_t(2) * (xhat - yhat);
    gx = (r - xhat * k[2]) * k[0];
    gy = (-r - yhat * k[3]) * k[1];
  }
}

template <int kMode, typename scalar_t>
__global__ void __launch_bounds__(kThreads) pair_grad_kernel(const scalar_t* __restrict__ x,
                                                              const scalar_t* __restrict__ y,
                                                              const acc_type<scalar_t>* __restrict__ coef,
                                                              scalar_t* __restrict__ grad_x,
                                                              scalar_t* __restrict__ grad_y, int64_t D,
                                                              int64_t chunk, bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  const int64_t n = blockIdx.x;
  const int64_t base = n * D;
  const int64_t begin = int64_t(blockIdx.y) * chunk, end = begin + chunk < D ? begin + chunk : D;
  const acc_t k[4] = {coef[n * 4], coef[n * 4 + 1], coef[n * 4 + 2], coef[n * 4 + 3]};
  if (vectorized) {
    for (int64_t i = base + begin + threadIdx.x * V; i < base + end; i += int64_t(kThreads) * V) {
      const auto xv = *reinterpret_cast<const Vec<scalar_t, V>*>(x + i);
      const auto yv = *reinterpret_cast<const Vec<scalar_t, V>*>(y + i);
      Vec<scalar_t, V> gxv, gyv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t gx, gy;
        pair_grad<kMode>(acc_t(xv.v[j]), acc_t(yv.v[j]), k, gx, gy);
        gxv.v[j] = static_cast<scalar_t>(gx);
        gyv.v[j] = static_cast<scalar_t>(gy);
      }
      if (grad_x != nullptr) *reinterpret_cast<Vec<scalar_t, V>*>(grad_x + i) = gxv;
      if (grad_y != nullptr) *reinterpret_cast<Vec<scalar_t, V>*>(grad_y + i) = gyv;
    }
  } else {
    for (int64_t i = base + begin + threadIdx.x; i < base + end; i += kThreads) {
      acc_t gx, gy;
      pair_grad<kMode>(acc_t(x[i]), acc_t(y[i]), k, gx, gy);
      if (grad_x != nullptr) grad_x[i] = static_cast<scalar_t>(gx);
      if (grad_y != nullptr) grad_y[i] = static_cast<scalar_t>(gy);
    }
  }
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

// d|v|^p / dv = p |v|^(p−1) sign(v) with sign(0) = 0, as autograd through abs().pow(p) computes it: 0 at
// v = 0 for p >= 1, and inf · 0 = NaN there for p < 1 (where |v|^p has no derivative).
template <typename acc_t>
__device__ __forceinline__ acc_t abs_pow_grad(acc_t v, acc_t p, int pow_kind) {
  if (pow_kind == kPowTwo) return acc_t(2) * v;
  if (v != v) return v;
  const acc_t sign = v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0));
  if (pow_kind == kPowOne) return sign;
  if (v == acc_t(0)) return p < acc_t(1) ? acc_t(NAN) : acc_t(0);
  return p * power(fabs(v), p - acc_t(1)) * sign;
}

// Element (c, hw) of sample n of a map is at n * stride_n + c * stride_c + hw * stride_hw.
struct MapLayout {
  int64_t channels, hw, stride_n, stride_c, stride_hw;
};

// a[n, hw] = Σ_c |F[n, c, hw]|^p. Both walks read memory in order:
//   kChannelsLast (channels contiguous): a warp per hw position, lanes over the channels, a warp reduction;
//   otherwise (hw contiguous): a block per tile of 32 hw positions, lanes over the positions, the 8 warps
//   over interleaved channels, then a reduction across warps through shared memory.
template <bool kChannelsLast, typename scalar_t>
__global__ void __launch_bounds__(kThreads) attention_map_kernel(const scalar_t* __restrict__ f, MapLayout l,
                                                                  acc_type<scalar_t> p, int pow_kind,
                                                                  acc_type<scalar_t>* __restrict__ a) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* fs = f + int64_t(blockIdx.x) * l.stride_n;
  acc_t* as = a + int64_t(blockIdx.x) * l.hw;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (kChannelsLast) {
    for (int64_t hw = int64_t(blockIdx.y) * kWarps + warp; hw < l.hw; hw += int64_t(gridDim.y) * kWarps) {
      const scalar_t* col = fs + hw * l.stride_hw;
      acc_t sum = 0;
      for (int64_t c = lane; c < l.channels; c += 32) sum += abs_pow(acc_t(col[c * l.stride_c]), p, pow_kind);
      sum = warp_sum(sum);
      if (lane == 0) as[hw] = sum;
    }
  } else {
    __shared__ acc_t partial[kWarps][32];
    for (int64_t tile = int64_t(blockIdx.y) * 32; tile < l.hw; tile += int64_t(gridDim.y) * 32) {
      const int64_t hw = tile + lane;
      acc_t sum = 0;
      if (hw < l.hw) {
        const scalar_t* row = fs + hw * l.stride_hw;
        for (int64_t c = warp; c < l.channels; c += kWarps) sum += abs_pow(acc_t(row[c * l.stride_c]), p, pow_kind);
      }
      partial[warp][lane] = sum;
      __syncthreads();
      if (warp == 0 && hw < l.hw) {
        acc_t total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
        as[hw] = total;
      }
      __syncthreads();  // `partial` is reused by the next tile
    }
  }
}

// dL/dF[n, c, hw] = dL/da[n, hw] · p |F|^(p−1) sign(F) for one map (self_index 0: student, 1: teacher);
// dL/da = (2(â − b̂) − â · proj) / ‖a‖ with b the other map. The gradient has its own strides (those of
// empty_like(F), so the same walk writes it in order). Threads are laid out as in attention_map_kernel.
template <bool kChannelsLast, typename scalar_t>
__global__ void __launch_bounds__(kThreads) attention_grad_kernel(
    const scalar_t* __restrict__ f, MapLayout l, scalar_t* __restrict__ grad, int64_t g_stride_n,
    int64_t g_stride_c, int64_t g_stride_hw, const acc_type<scalar_t>* __restrict__ a_self,
    const acc_type<scalar_t>* __restrict__ a_other, const acc_type<scalar_t>* __restrict__ coef, int self_index,
    acc_type<scalar_t> p, int pow_kind) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const acc_t inv_self = coef[n * 4 + self_index], inv_other = coef[n * 4 + 1 - self_index];
  const acc_t proj = coef[n * 4 + 2 + self_index];
  const scalar_t* fs = f + n * l.stride_n;
  scalar_t* gs = grad + n * g_stride_n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto grad_a = [&](int64_t hw) {
    const acc_t a_hat = a_self[n * l.hw + hw] * inv_self, b_hat = a_other[n * l.hw + hw] * inv_other;
    return (acc_t(2) * (a_hat - b_hat) - a_hat * proj) * inv_self;
  };
  auto write = [&](int64_t c, int64_t hw, acc_t g) {
    const acc_t v = acc_t(fs[c * l.stride_c + hw * l.stride_hw]);
    gs[c * g_stride_c + hw * g_stride_hw] = static_cast<scalar_t>(g * abs_pow_grad(v, p, pow_kind));
  };
  if (kChannelsLast) {
    for (int64_t hw = int64_t(blockIdx.y) * kWarps + warp; hw < l.hw; hw += int64_t(gridDim.y) * kWarps) {
      const acc_t g = grad_a(hw);
      for (int64_t c = lane; c < l.channels; c += 32) write(c, hw, g);
    }
  } else {
    for (int64_t tile = int64_t(blockIdx.y) * 32; tile < l.hw; tile += int64_t(gridDim.y) * 32) {
      const int64_t hw = tile + lane;
      if (hw >= l.hw) continue;
      const acc_t g = grad_a(hw);
      for (int64_t c = warp; c < l.channels; c += kWarps) write(c, hw, g);
    }
  }
}

// ---- host side ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool same_flat_order(const at::Tensor& s, const at::Tensor& t) {
  if (s.is_contiguous() && t.is_contiguous()) return true;
  return s.dim() == 4 && s.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

bool in_place_layout(const at::Tensor& x) {
  return x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// A size-1 dim may carry any stride: hw = h*W + w steps by W's stride unless W == 1.
int64_t hw_stride(const at::Tensor& x) { return x.size(3) > 1 ? x.stride(3) : x.stride(2); }

MapLayout map_layout(const at::Tensor& x) {
  return {x.size(1), x.size(2) * x.size(3), x.stride(0), x.stride(1), hw_stride(x)};
}

bool channels_last_walk(const MapLayout& l) { return l.stride_hw != 1 && l.stride_c == 1; }

struct Launch {
  int64_t chunk;
  int n_chunks;
};

// Chunks per sample: enough blocks to fill the GPU (8 per SM) when the batch alone does not, each thread
// doing at least 4 vector loads per chunk; chunk a multiple of the block's vector stride.
Launch chunking(int64_t size, int64_t rows, int sm_count, int vec) {
  const int64_t step = int64_t(kThreads) * vec;
  const int64_t wanted = ceil_div(int64_t(sm_count) * 8, std::max<int64_t>(rows, 1));
  const int64_t most = ceil_div(std::max<int64_t>(size, 1), step * 4);
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>({wanted, most, kMaxChunks}));
  const int64_t chunk = ceil_div(ceil_div(std::max<int64_t>(size, 1), n_chunks), step) * step;
  return {chunk, static_cast<int>(ceil_div(std::max<int64_t>(size, 1), chunk))};
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Steps 1-3 for rows samples of `size` elements at x, y (the modes 0/1 inputs, or the two attention maps).
template <typename scalar_t>
void pair_stats_and_grad(const scalar_t* x, const scalar_t* y, int64_t rows, int64_t size, int mode,
                         const Launch& launch, acc_type<scalar_t>* partials, acc_type<scalar_t>* losses,
                         acc_type<scalar_t>* coef, scalar_t* grad_x, scalar_t* grad_y, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  const bool vectorized = size % V == 0 && launch.chunk % V == 0 && aligned(x) && aligned(y) &&
                          (grad_x == nullptr || aligned(grad_x)) && (grad_y == nullptr || aligned(grad_y));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(launch.n_chunks));
  const auto partials_kernel = mode == kMse ? pair_partials_kernel<kMse, scalar_t>
                                             : pair_partials_kernel<kNormalized, scalar_t>;
  partials_kernel<<<grid, kThreads, 0, stream>>>(x, y, partials, size, launch.chunk, launch.n_chunks, vectorized);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      partials, launch.n_chunks, size, rows, mode == kMse, losses, coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (grad_x == nullptr && grad_y == nullptr) return;
  const auto grad_kernel = mode == kMse ? pair_grad_kernel<kMse, scalar_t> : pair_grad_kernel<kNormalized, scalar_t>;
  grad_kernel<<<grid, kThreads, 0, stream>>>(x, y, coef, grad_x, grad_y, size, launch.chunk, vectorized);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_attention_map(const at::Tensor& f, int64_t lo, int64_t rows, acc_type<scalar_t> p, int pow_kind,
                          acc_type<scalar_t>* a, cudaStream_t stream) {
  const MapLayout l = map_layout(f);
  const scalar_t* base = f.const_data_ptr<scalar_t>() + lo * l.stride_n;
  const bool cl = channels_last_walk(l);
  const int64_t per_block = cl ? kWarps : 32;  // hw positions per block
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>(std::clamp<int64_t>(ceil_div(l.hw, per_block), 1, kMaxGridY)));
  if (cl) {
    attention_map_kernel<true, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, p, pow_kind, a);
  } else {
    attention_map_kernel<false, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, p, pow_kind, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_attention_grad(const at::Tensor& f, at::Tensor& grad, int64_t lo, int64_t rows,
                           const acc_type<scalar_t>* a_self, const acc_type<scalar_t>* a_other,
                           const acc_type<scalar_t>* coef, int self_index, acc_type<scalar_t> p, int pow_kind,
                           cudaStream_t stream) {
  const MapLayout l = map_layout(f);
  const scalar_t* base = f.const_data_ptr<scalar_t>() + lo * l.stride_n;
  scalar_t* g = grad.mutable_data_ptr<scalar_t>() + lo * grad.stride(0);
  const bool cl = channels_last_walk(l);
  const int64_t per_block = cl ? kWarps : 32;  // hw positions per block
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>(std::clamp<int64_t>(ceil_div(l.hw, per_block), 1, kMaxGridY)));
  if (cl) {
    attention_grad_kernel<true, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, g, grad.stride(0), grad.stride(1),
                                                               hw_stride(grad), a_self, a_other, coef, self_index,
                                                               p, pow_kind);
  } else {
    attention_grad_kernel<false, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, g, grad.stride(0), grad.stride(1),
                                                                hw_stride(grad), a_self, a_other, coef, self_index,
                                                                p, pow_kind);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t mode, double p) {
  TORCH_CHECK_VALUE(student.is_cuda() && teacher.is_cuda(), "feature_distance_fwd (CUDA): expected CUDA tensors, got ",
                    student.device(), " and ", teacher.device());
  TORCH_CHECK_VALUE(student.device() == teacher.device(), "feature_distance_fwd: student and teacher are on ",
                    student.device(), " and ", teacher.device());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "feature_distance_fwd: unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)");
  TORCH_CHECK_TYPE(teacher.scalar_type() == dtype, "feature_distance_fwd: student and teacher dtypes differ: ",
                   dtype, " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(mode == kMse || mode == kNormalized || mode == kAttention,
                    "feature_distance_fwd: mode must be 0 (mse), 1 (normalized) or 2 (attention), got ", mode);
  TORCH_CHECK_VALUE(student.dim() >= 1 && teacher.dim() >= 1 && student.size(0) == teacher.size(0),
                    "feature_distance_fwd: student and teacher need the same batch size in dim 0, got shapes ",
                    student.sizes(), " and ", teacher.sizes());
  if (mode == kAttention) {
    TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4 && student.size(2) == teacher.size(2) &&
                          student.size(3) == teacher.size(3),
                      "feature_distance_fwd: mode 2 (attention) takes 4-D (N, C, H, W) maps with equal H, W, got ",
                      student.sizes(), " and ", teacher.sizes());
    TORCH_CHECK_VALUE(in_place_layout(student) && in_place_layout(teacher),
                      "feature_distance_fwd: mode 2 (attention) reads contiguous or channels_last tensors, got "
                      "strides ", student.strides(), " and ", teacher.strides());
    TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, "feature_distance_fwd: p must be a finite number > 0, got ", p);
  } else {
    TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "feature_distance_fwd: modes 0 and 1 need equal shapes, got ",
                      student.sizes(), " and ", teacher.sizes());
    TORCH_CHECK_VALUE(same_flat_order(student, teacher),
                      "feature_distance_fwd: modes 0 and 1 need student and teacher both contiguous or both "
                      "channels_last, got strides ", student.strides(), " and ", teacher.strides());
  }
}

// Sample groups: all at once when each sample is read once; when a gradient pass re-reads them, groups whose
// bytes fit in half the L2 cache.
int64_t group_rows(int64_t n, int64_t bytes_per_sample, bool two_pass, int device) {
  if (!two_pass) return n;
  int l2 = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  const int64_t budget = std::max<int64_t>(l2, 1 << 20) / 2;
  return std::clamp<int64_t>(budget / std::max<int64_t>(bytes_per_sample, 1), 1, n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                         const at::Tensor& teacher, int64_t mode,
                                                                         double p, bool grad_student,
                                                                         bool grad_teacher) {
  check_inputs(student, teacher, mode, p);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n = student.size(0);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor losses = at::empty({n}, student.options().dtype(acc_dtype));
  // empty_like keeps the input's strides (contiguous or channels_last), as the Python fake does
  at::Tensor grad_s = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (n == 0) return {losses, grad_s, grad_t};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = student.get_device();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t size_s = student.numel() / n, size_t_ = teacher.numel() / n;
  const int64_t group =
      group_rows(n, (size_s + size_t_) * student.element_size(), grad_student || grad_teacher, device);
  at::Tensor coef = at::empty({n, 4}, losses.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* loss_ptr = losses.mutable_data_ptr<acc_t>();
    acc_t* coef_ptr = coef.mutable_data_ptr<acc_t>();
    if (mode != kAttention) {
      // modes 0, 1: sample i is the flat block [i * D, (i + 1) * D) of both tensors, in the same order
      const Launch launch = chunking(size_s, group, sm_count, vec_size<scalar_t>());
      at::Tensor partials = at::empty({n, launch.n_chunks, 3}, losses.options());
      const scalar_t* x = student.const_data_ptr<scalar_t>();
      const scalar_t* y = teacher.const_data_ptr<scalar_t>();
      scalar_t* gx = grad_student ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gy = grad_teacher ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t lo = 0; lo < n; lo += group) {
        const int64_t rows = std::min(group, n - lo), off = lo * size_s;
        pair_stats_and_grad<scalar_t>(x + off, y + off, rows, size_s, static_cast<int>(mode), launch,
                                      partials.mutable_data_ptr<acc_t>() + lo * launch.n_chunks * 3, loss_ptr + lo,
                                      coef_ptr + lo * 4, gx ? gx + off : nullptr, gy ? gy + off : nullptr, stream);
      }
      return;
    }
    const int64_t hw = student.size(2) * student.size(3);
    const int pow_kind = p == 2.0 ? kPowTwo : (p == 1.0 ? kPowOne : kPowAny);
    const acc_t p_acc = static_cast<acc_t>(p);
    at::Tensor maps = at::empty({2, n, hw}, losses.options());  // a_student, a_teacher
    acc_t* a_s = maps.mutable_data_ptr<acc_t>();
    acc_t* a_t = a_s + n * hw;
    const Launch launch = chunking(hw, group, sm_count, vec_size<acc_t>());
    at::Tensor partials = at::empty({n, launch.n_chunks, 3}, losses.options());
    for (int64_t lo = 0; lo < n; lo += group) {
      const int64_t rows = std::min(group, n - lo);
      launch_attention_map<scalar_t>(student, lo, rows, p_acc, pow_kind, a_s + lo * hw, stream);
      launch_attention_map<scalar_t>(teacher, lo, rows, p_acc, pow_kind, a_t + lo * hw, stream);
      pair_stats_and_grad<acc_t>(a_s + lo * hw, a_t + lo * hw, rows, hw, kNormalized, launch,
                                 partials.mutable_data_ptr<acc_t>() + lo * launch.n_chunks * 3, loss_ptr + lo,
                                 coef_ptr + lo * 4, nullptr, nullptr, stream);
      if (grad_student) {
        launch_attention_grad<scalar_t>(student, grad_s, lo, rows, a_s + lo * hw, a_t + lo * hw, coef_ptr + lo * 4,
                                        0, p_acc, pow_kind, stream);
      }
      if (grad_teacher) {
        launch_attention_grad<scalar_t>(teacher, grad_t, lo, rows, a_t + lo * hw, a_s + lo * hw, coef_ptr + lo * 4,
                                        1, p_acc, pow_kind, stream);
      }
    }
  });
  return {losses, grad_s, grad_t};
}

TORCH_LIBRARY_IMPL(rkd_fast, CUDA, m) { m.impl("feature_distance_fwd", &feature_distance_fwd_cuda); }

}  // namespace rkd_fast
