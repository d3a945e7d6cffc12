// The vector helpers both CPU kernels share: at::vec::Vectorized in the accumulation type (float for
// float/half/bfloat16 inputs, double for double), loaded and stored in blocks of two vectors: the natural unit of
// a half/bfloat16 load (one Vectorized<Half> converts to two Vectorized<float>), and two independent add chains
// for float.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace rkd_fast {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;
template <typename scalar_t>
using AccVec = at::vec::Vectorized<acc_t<scalar_t>>;

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

}  // namespace rkd_fast
