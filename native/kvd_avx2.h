// kvd's AVX2 building blocks (eight float32 lanes, FMA), shared by the kernels on CPUs
// without AVX-512 (AVX2-only EPYCs and Xeons before Skylake-SP): included where the build
// has __AVX2__ and __FMA__ but not __AVX512F__. The same pieces as kvd_simd.h at half the
// width, with the same rounding and the same exp: a kernel gives the same values on
// either, up to the order of its sums. AVX2 has sixteen vector registers (AVX-512 has
// 32), so the kernels keep fewer accumulators live and split wide rows into column passes.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "kvd_math.h"

namespace kvd::avx2 {

constexpr int kW = 8;  // lanes

// Eight values of a row as float32 (bfloat16 widened: the top half of a float32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// float32 lanes rounded to bfloat16 as c10::BFloat16 rounds (to nearest even, NaN to the
// quiet NaN 0x7FC0), as eight 32-bit lanes holding the bit patterns.
inline __m256i bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// Eight float32 lanes stored as T (bfloat16 rounded as above).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  // packus narrows within each 128-bit half; the permute gathers the two halves' results
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(v), _mm256_setzero_si256());
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}

// v rounded to T and read back as float32: what storing and reloading it would give.
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
  }
}

// exp_neg (kvd_math.h) on eight lanes: the same steps and constants.
inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLowest));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Lane i of the result is the sum of a[i]'s eight lanes (one transposing tree of adds).
inline __m256 hsum8(const __m256* a) {
  const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);  // per 128-bit half: a[0..3], a[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

// A mask of the first n (0..8) lanes, for maskload / maskstore.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// sc[t] = e^(sc[t] - max) over a row of L scores; returns their sum.
inline float softmax_row(float* sc, int64_t L) {
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = lowest;
  int64_t t = 0;
  for (; t + kW <= L; t += kW) m = _mm256_max_ps(m, _mm256_loadu_ps(sc + t));
  const __m256i tail = first_lanes(L - t);
  m = _mm256_max_ps(m, _mm256_blendv_ps(lowest, _mm256_maskload_ps(sc + t, tail), _mm256_castsi256_ps(tail)));
  const __m256 mx = _mm256_set1_ps(reduce_max8(m));
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t + kW <= L; t += kW) {
    const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mx));
    _mm256_storeu_ps(sc + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (t < L) {
    const __m256 e = _mm256_and_ps(exp_neg8(_mm256_sub_ps(_mm256_maskload_ps(sc + t, tail), mx)),
                                   _mm256_castsi256_ps(tail));
    _mm256_maskstore_ps(sc + t, tail, e);
    sum = _mm256_add_ps(sum, e);
  }
  return reduce_add8(sum);
}

// The P . V core of both attention kernels on columns [8 c0, 8 (c0 + NC)) of the head:
// weigh_cols adds w[r * ld] times one V row (read from `row`) to row r's accumulators;
// store_cols writes out[r] = acc[r] / denom[r] as T.
template <int NC, int kR, typename T>
inline void weigh_cols(__m256 (&acc)[kR][NC], const T* row, const float* w, int64_t ld) {
  __m256 x[NC];
  for (int i = 0; i < NC; ++i) x[i] = load8(row + kW * i);
  for (int r = 0; r < kR; ++r) {
    const __m256 s = _mm256_broadcast_ss(w + r * ld);
    for (int i = 0; i < NC; ++i) acc[r][i] = _mm256_fmadd_ps(s, x[i], acc[r][i]);
  }
}

template <typename T, int NC, int kR>
inline void store_cols(const __m256 (&acc)[kR][NC], const float* denom, T* const* out) {
  for (int r = 0; r < kR; ++r) {
    const __m256 inv = _mm256_set1_ps(1.f / denom[r]);
    for (int i = 0; i < NC; ++i) store8(out[r] + kW * i, _mm256_mul_ps(acc[r][i], inv));
  }
}

}  // namespace kvd::avx2
