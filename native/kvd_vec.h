// The float32 vector of this build, and the code written once over it: the instruction
// set's header (kvd_simd.h on AVX-512, kvd_avx2.h on AVX2 with FMA) defines `Vec`'s
// operations, this header the steps that are the same at either width. KVD_VEC is defined
// where there is a vector path at all; elsewhere the kernels take their scalar code.
#pragma once

#include <cstdint>
#include <limits>

#include "kvd_math.h"
#if defined(__AVX512F__)
#include "kvd_simd.h"
#define KVD_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
#include "kvd_avx2.h"
#define KVD_VEC 1
#endif

#if defined(KVD_VEC)
namespace kvd {

#if defined(__AVX512F__)
using Vec = Vec16;
#else
using Vec = avx2::Vec8;
#endif

// exp_neg (kvd_math.h) on a vector: the same steps and constants.
inline Vec::V exp_neg(Vec::V x) {
  x = Vec::max(x, Vec::set1(kExpLowest));
  const Vec::V t = Vec::mul(x, Vec::set1(kLog2e));
  const Vec::V n = Vec::nearest(t);
  const Vec::V f = Vec::sub(t, n);
  Vec::V p = Vec::set1(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = Vec::fmadd(p, f, Vec::set1(kExp2Poly[i]));
  return Vec::times_pow2(p, n);
}

// sc[t] = e^(sc[t] - max) over a row of L scores; returns their sum. A vector at a time: a
// scalar max and sum are chains of dependent adds, which had cost more than the dots.
inline float softmax_row(float* sc, int64_t L) {
  constexpr int64_t W = Vec::kLanes;
  const Vec::V lowest = Vec::set1(-std::numeric_limits<float>::infinity());
  Vec::V m = lowest;
  int64_t t = 0;
  for (; t + W <= L; t += W) m = Vec::max(m, Vec::load(sc + t));
  m = Vec::max(m, Vec::load_first(sc + t, L - t, lowest));
  const Vec::V mx = Vec::set1(Vec::max_of(m));
  Vec::V sum = Vec::zero();
  for (t = 0; t + W <= L; t += W) {
    const Vec::V e = exp_neg(Vec::sub(Vec::load(sc + t), mx));
    Vec::store(sc + t, e);
    sum = Vec::add(sum, e);
  }
  if (t < L) {
    const Vec::V e = exp_neg(Vec::sub(Vec::load_first(sc + t, L - t, mx), mx));
    Vec::store_first(sc + t, L - t, e);
    sum = Vec::add(sum, Vec::keep_first(e, L - t));
  }
  return Vec::sum(sum);
}

}  // namespace kvd
#endif
