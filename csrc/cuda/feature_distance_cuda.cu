// rkd_fast::feature_distance_fwd and rkd_fast::feature_distance_bwd on CUDA.
//
// Per sample the loss depends on the data only through a few sums, and its gradient is linear in the inputs
// with four per-sample coefficients (modes 0, 1): d loss/d s = c0 s + c1 t, d loss/d t = c2 s + c3 t.
// forward (reads each input once, writes nothing gradient-sized):
//   1. pair_partials_kernel, grid (sample, chunk): each block reduces one chunk of one sample to partial sums
//      (mode 0: Σ(x−y)²; modes 1 and 2: Σx², Σy², Σxy) with warp shuffles and a block reduction, written to a
//      (N, chunks, 3) buffer. No atomics: the order of the sums is fixed, so results are deterministic.
//   2. finalize_kernel, one warp per sample: adds the sample's partials (in double), writes its loss and
//      coeffs[n] = (c0, c1, c2, c3).
// backward (reads each input once, writes each asked-for gradient once):
//   3. pair_grad_kernel, grid (sample, chunk): grad_losses[n] · (c0 x + c1 y) and grad_losses[n] · (c2 x + c3 y).
// Mode 2 ("attention"): the forward builds the unnormalised maps a[n, hw] = Σ_c |F[c, hw]|^p of student and
// teacher with attention_map_kernel, each tensor through its own strides (contiguous: lanes over 32
// consecutive hw positions, warps over channels; channels_last: a warp per hw position, lanes over its
// contiguous channels), returns them, and runs steps 1 and 2 on the two maps (normalised-mode coefficients);
// the backward's attention_grad_kernel forms dL/da = c·(a_s, a_t) and chains it into dL/dF.
//
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
#include <initializer_list>
#include <tuple>

#include "kernels.h"

namespace rkd_fast {
namespace {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr double kNormEps = 1e-12;  // floor of ‖x‖, as in torch.nn.functional.normalize
constexpr int kMaxChunks = 1024;     // per sample; keeps the partials small and the finalize loop short
constexpr int kMaxGridY = 65535;

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
// mode 0: coef = 2/D · (1, −1, −1, 1). Modes 1, 2, with the norms floored at eps: c0 = (2 − k_x)/‖x‖²,
// c1 = c2 = −2/(‖x‖‖y‖), c3 = (2 − k_y)/‖y‖², where k_x = x̂·r and k_y = ŷ·(−r), r = 2(x̂ − ŷ), are the
// projections the normalisation removes from the gradient.
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
    const double scale = 2.0 / double(D);
    k[0] = static_cast<acc_t>(scale);
    k[1] = static_cast<acc_t>(-scale);
    k[2] = static_cast<acc_t>(-scale);
    k[3] = static_cast<acc_t>(scale);
    return;
  }
  const double xx = s[0], yy = s[1], xy = s[2];
  const double norm_x = sqrt(xx), norm_y = sqrt(yy);
  // `norm < eps ? eps : norm` keeps a NaN norm NaN, as clamp_min does
  const double inv_x = 1.0 / (norm_x < kNormEps ? kNormEps : norm_x);
  const double inv_y = 1.0 / (norm_y < kNormEps ? kNormEps : norm_y);
  const double xhat_xhat = xx * inv_x * inv_x, yhat_yhat = yy * inv_y * inv_y, xhat_yhat = xy * inv_x * inv_y;
  losses[n] = static_cast<acc_t>(xhat_xhat + yhat_yhat - 2.0 * xhat_yhat);
  // below the floor the norm is a constant, so the gradient has no projection term
  const double proj_x = norm_x > kNormEps ? 2.0 * (xhat_xhat - xhat_yhat) : 0.0;
  const double proj_y = norm_y > kNormEps ? 2.0 * (yhat_yhat - xhat_yhat) : 0.0;
  const double cross = -2.0 * inv_x * inv_y;
  k[0] = static_cast<acc_t>((2.0 - proj_x) * inv_x * inv_x);
  k[1] = static_cast<acc_t>(cross);
  k[2] = static_cast<acc_t>(cross);
  k[3] = static_cast<acc_t>((2.0 - proj_y) * inv_y * inv_y);
}

// ---- step 3 (the backward), modes 0 and 1: grad_losses[n] · d loss_n / dx and / dy of one (sample, chunk) ----
// k = grad_losses[n] · coef[n].
template <int kMode, typename acc_t>
__device__ __forceinline__ void pair_grad(acc_t x, acc_t y, const acc_t (&k)[4], acc_t& gx, acc_t& gy) {
  if (kMode == kMse) {
    // mse's coefficients are c·(1, −1, −1, 1): the difference first, exact when x and y are close
    const acc_t d = x - y;
    gx = d * k[0];
    gy = -(d * k[3]);
  } else {
    gx = k[0] * x + k[1] * y;
    gy = k[2] * x + k[3] * y;
  }
}

template <int kMode, typename scalar_t>
__global__ void __launch_bounds__(kThreads) pair_grad_kernel(const scalar_t* __restrict__ x,
                                                              const scalar_t* __restrict__ y,
                                                              const acc_type<scalar_t>* __restrict__ coef,
                                                              const acc_type<scalar_t>* __restrict__ grad_losses,
                                                              scalar_t* __restrict__ grad_x,
                                                              scalar_t* __restrict__ grad_y, int64_t D,
                                                              int64_t chunk, bool vectorized) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  const int64_t n = blockIdx.x;
  const int64_t base = n * D;
  const int64_t begin = int64_t(blockIdx.y) * chunk, end = begin + chunk < D ? begin + chunk : D;
  const acc_t g = grad_losses[n];
  const acc_t k[4] = {coef[n * 4] * g, coef[n * 4 + 1] * g, coef[n * 4 + 2] * g, coef[n * 4 + 3] * g};
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

// The backward of mode 2 for one map (self_index 0: student, 1: teacher):
//   grad[n, c, hw] = grad_losses[n] · dL/da[n, hw] · p |F|^(p−1) sign(F),
// dL/da_s = c0 a_s + c1 a_t and dL/da_t = c2 a_s + c3 a_t. The gradient has its own strides (those of
// empty_like(F), so the same walk writes it in order). Threads are laid out as in attention_map_kernel.
template <bool kChannelsLast, typename scalar_t>
__global__ void __launch_bounds__(kThreads) attention_grad_kernel(
    const scalar_t* __restrict__ f, MapLayout l, scalar_t* __restrict__ grad, int64_t g_stride_n,
    int64_t g_stride_c, int64_t g_stride_hw, const acc_type<scalar_t>* __restrict__ a_s,
    const acc_type<scalar_t>* __restrict__ a_t, const acc_type<scalar_t>* __restrict__ coef,
    const acc_type<scalar_t>* __restrict__ grad_losses, int self_index, acc_type<scalar_t> p, int pow_kind) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const acc_t g = grad_losses[n];
  const acc_t k_s = coef[n * 4 + 2 * self_index] * g, k_t = coef[n * 4 + 2 * self_index + 1] * g;
  const scalar_t* fs = f + n * l.stride_n;
  scalar_t* gs = grad + n * g_stride_n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto grad_a = [&](int64_t hw) { return k_s * a_s[n * l.hw + hw] + k_t * a_t[n * l.hw + hw]; };
  auto write = [&](int64_t c, int64_t hw, acc_t ga) {
    const acc_t v = acc_t(fs[c * l.stride_c + hw * l.stride_hw]);
    gs[c * g_stride_c + hw * g_stride_hw] = static_cast<scalar_t>(ga * abs_pow_grad(v, p, pow_kind));
  };
  if (kChannelsLast) {
    for (int64_t hw = int64_t(blockIdx.y) * kWarps + warp; hw < l.hw; hw += int64_t(gridDim.y) * kWarps) {
      const acc_t ga = grad_a(hw);
      for (int64_t c = lane; c < l.channels; c += 32) write(c, hw, ga);
    }
  } else {
    for (int64_t tile = int64_t(blockIdx.y) * 32; tile < l.hw; tile += int64_t(gridDim.y) * 32) {
      const int64_t hw = tile + lane;
      if (hw >= l.hw) continue;
      const acc_t ga = grad_a(hw);
      for (int64_t c = warp; c < l.channels; c += kWarps) write(c, hw, ga);
    }
  }
}

// ---- host side ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// Steps 1 and 2 for n samples of `size` elements at x, y (the modes 0/1 inputs, or the two attention maps).
template <typename scalar_t>
void pair_stats(const scalar_t* x, const scalar_t* y, int64_t n, int64_t size, int mode, int device,
                const at::Tensor& losses, const at::Tensor& coeffs, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Launch launch = chunking(size, n, device, vec_size<scalar_t>());
  at::Tensor partials = at::empty({n, launch.n_chunks, 3}, losses.options());
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(launch.n_chunks));
  const auto partials_kernel = mode == kMse ? pair_partials_kernel<kMse, scalar_t>
                                             : pair_partials_kernel<kNormalized, scalar_t>;
  partials_kernel<<<grid, kThreads, 0, stream>>>(x, y, partials.mutable_data_ptr<acc_t>(), size, launch.chunk,
                                                 launch.n_chunks, can_vectorize<scalar_t>(size, launch, {x, y}));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(n, kWarps)), kThreads, 0, stream>>>(
      partials.const_data_ptr<acc_t>(), launch.n_chunks, size, n, mode == kMse, losses.mutable_data_ptr<acc_t>(),
      coeffs.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

dim3 attention_grid(const MapLayout& l, int64_t n) {
  const int64_t per_block = channels_last_walk(l) ? kWarps : 32;  // hw positions per block
  return dim3(static_cast<unsigned>(n), static_cast<unsigned>(std::clamp<int64_t>(ceil_div(l.hw, per_block), 1,
                                                                                  kMaxGridY)));
}

template <typename scalar_t>
void launch_attention_map(const at::Tensor& f, acc_type<scalar_t> p, int pow_kind, at::Tensor& a,
                          cudaStream_t stream) {
  const MapLayout l = map_layout(f);
  const dim3 grid = attention_grid(l, f.size(0));
  const scalar_t* base = f.const_data_ptr<scalar_t>();
  acc_type<scalar_t>* out = a.mutable_data_ptr<acc_type<scalar_t>>();
  if (channels_last_walk(l)) {
    attention_map_kernel<true, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, p, pow_kind, out);
  } else {
    attention_map_kernel<false, scalar_t><<<grid, kThreads, 0, stream>>>(base, l, p, pow_kind, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_attention_grad(const at::Tensor& f, at::Tensor& grad, const at::Tensor& map_s, const at::Tensor& map_t,
                           const at::Tensor& coeffs, const at::Tensor& grad_losses, int self_index,
                           acc_type<scalar_t> p, int pow_kind, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const MapLayout l = map_layout(f);
  const dim3 grid = attention_grid(l, f.size(0));
  const auto kernel = channels_last_walk(l) ? attention_grad_kernel<true, scalar_t>
                                            : attention_grad_kernel<false, scalar_t>;
  kernel<<<grid, kThreads, 0, stream>>>(f.const_data_ptr<scalar_t>(), l, grad.mutable_data_ptr<scalar_t>(),
                                        grad.stride(0), grad.stride(1), hw_stride(grad),
                                        map_s.const_data_ptr<acc_t>(), map_t.const_data_ptr<acc_t>(),
                                        coeffs.const_data_ptr<acc_t>(), grad_losses.const_data_ptr<acc_t>(),
                                        self_index, p, pow_kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int pow_kind_of(double p) { return p == 2.0 ? kPowTwo : (p == 1.0 ? kPowOne : kPowAny); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_distance_fwd_cuda(const at::Tensor& student,
                                                                                     const at::Tensor& teacher,
                                                                                     int64_t mode, double p) {
  check_feature_distance_inputs("feature_distance_fwd", student, teacher, mode, p, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t n = student.size(0);
  const auto acc_options = student.options().dtype(accumulate_dtype(student));
  const int64_t hw = mode == kAttention ? student.size(2) * student.size(3) : 0;
  at::Tensor losses = at::empty({n}, acc_options);
  at::Tensor coeffs = at::empty({n, 4}, acc_options);
  at::Tensor map_s = mode == kAttention ? at::empty({n, hw}, acc_options) : at::empty({0}, acc_options);
  at::Tensor map_t = mode == kAttention ? at::empty({n, hw}, acc_options) : at::empty({0}, acc_options);
  if (n == 0) return {losses, coeffs, map_s, map_t};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = student.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_fwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    if (mode != kAttention) {
      // modes 0, 1: sample i is the flat block [i * D, (i + 1) * D) of both tensors, in the same order
      pair_stats<scalar_t>(student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), n,
                           student.numel() / n, static_cast<int>(mode), device, losses, coeffs, stream);
      return;
    }
    const acc_t p_acc = static_cast<acc_t>(p);
    launch_attention_map<scalar_t>(student, p_acc, pow_kind_of(p), map_s, stream);
    launch_attention_map<scalar_t>(teacher, p_acc, pow_kind_of(p), map_t, stream);
    pair_stats<acc_t>(map_s.const_data_ptr<acc_t>(), map_t.const_data_ptr<acc_t>(), n, hw, kNormalized, device,
                      losses, coeffs, stream);
  });
  return {losses, coeffs, map_s, map_t};
}

std::tuple<at::Tensor, at::Tensor> feature_distance_bwd_cuda(const at::Tensor& grad_losses, const at::Tensor& student,
                                                             const at::Tensor& teacher, const at::Tensor& coeffs,
                                                             const at::Tensor& map_s, const at::Tensor& map_t,
                                                             int64_t mode, double p, bool grad_student,
                                                             bool grad_teacher) {
  check_feature_distance_inputs("feature_distance_bwd", student, teacher, mode, p, c10::DeviceType::CUDA);
  check_feature_distance_saved(grad_losses, coeffs, map_s, map_t, student, mode);
  const int64_t n = student.size(0);
  const c10::cuda::CUDAGuard guard(student.device());
  // empty_like keeps the input's strides (contiguous or channels_last), as the Python fake does
  at::Tensor grad_s = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (n == 0 || !(grad_student || grad_teacher)) return {grad_s, grad_t};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = student.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "feature_distance_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    if (mode != kAttention) {
      // one pass reads x and y once and writes both gradients
      const int64_t size = student.numel() / n;
      const Launch launch = chunking(size, n, device, vec_size<scalar_t>());
      const scalar_t* x = student.const_data_ptr<scalar_t>();
      const scalar_t* y = teacher.const_data_ptr<scalar_t>();
      scalar_t* gx = grad_student ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gy = grad_teacher ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(launch.n_chunks));
      const auto kernel = mode == kMse ? pair_grad_kernel<kMse, scalar_t> : pair_grad_kernel<kNormalized, scalar_t>;
      kernel<<<grid, kThreads, 0, stream>>>(x, y, coeffs.const_data_ptr<acc_t>(), grad_losses.const_data_ptr<acc_t>(),
                                            gx, gy, size, launch.chunk,
                                            can_vectorize<scalar_t>(size, launch, {x, y, gx, gy}));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const acc_t p_acc = static_cast<acc_t>(p);
    if (grad_student) {
      launch_attention_grad<scalar_t>(student, grad_s, map_s, map_t, coeffs, grad_losses, 0, p_acc, pow_kind_of(p),
                                      stream);
    }
    if (grad_teacher) {
      launch_attention_grad<scalar_t>(teacher, grad_t, map_s, map_t, coeffs, grad_losses, 1, p_acc, pow_kind_of(p),
                                      stream);
    }
  });
  return {grad_s, grad_t};
}

TORCH_LIBRARY_IMPL(rkd_fast, CUDA, m) {
  m.impl("feature_distance_fwd", &feature_distance_fwd_cuda);
  m.impl("feature_distance_bwd", &feature_distance_bwd_cuda);
}

}  // namespace rkd_fast
