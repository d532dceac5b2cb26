// kvd's AVX2 building blocks (eight float32 lanes, FMA), shared by the kernels on CPUs
// without AVX-512 (AVX2-only EPYCs and Xeons before Skylake-SP): included, through
// kvd_vec.h, where the build has __AVX2__ and __FMA__ but not __AVX512F__. The same pieces
// as kvd_simd.h at half the width, with the same rounding: a kernel gives the same values
// on either, up to the order of its sums. AVX2 has sixteen vector registers (AVX-512 has
// 32), so the kernels keep fewer accumulators live and split wide rows into column passes.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

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

// The eight float32 lanes of an AVX2 register as the code written once for both widths
// sees them (kvd_vec.h): kvd_simd.h's Vec16 at half the width.
struct Vec8 {
  using V = __m256;
  static constexpr int64_t kLanes = kW;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  template <typename T>
  static V load(const T* p) { return load8(p); }
  template <typename T>
  static void store(T* p, V v) { store8(p, v); }
  template <typename T>
  static V round(V v) { return round8<T>(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V neg(V a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.f)); }
  static V neg_abs(V a) { return _mm256_or_ps(a, _mm256_set1_ps(-0.f)); }  // -|a|: the sign bit set
  static V if_nonneg(V x, V a, V b) {  // x >= 0 ? a : b, lane by lane
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  }
  static V nearest(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V times_pow2(V p, V n) {  // p * 2^n for integral n, by adding n to p's exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  static float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float max_of(V a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  // The first n (0..7) lanes: read from p with the others `fill`, kept with the others 0,
  // written to p.
  static V load_first(const float* p, int64_t n, V fill) {
    const __m256i m = first_lanes(n);
    return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static V keep_first(V a, int64_t n) { return _mm256_and_ps(a, _mm256_castsi256_ps(first_lanes(n))); }
  static void store_first(float* p, int64_t n, V a) { _mm256_maskstore_ps(p, first_lanes(n), a); }
};

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
