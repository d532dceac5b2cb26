// kvd's AVX-512 building blocks, shared by the kernels (included, through kvd_vec.h, only
// where the build has __AVX512F__; kvd_avx2.h holds the same at eight lanes): bf16
// widening and rounding, the Vec16 operations and the P . V core.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

namespace kvd {

// Sixteen values of a row as float32 (bfloat16 widened: the top half of a float32).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 lanes rounded to bfloat16 as c10::BFloat16 rounds (to nearest even, NaN to a
// quiet NaN), as the sixteen bf16 bit patterns.
inline __m256i bf16_bits16(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);  // one instruction; NaNs stay NaN (not the canonical one)
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

// Sixteen float32 lanes stored as T (bfloat16 rounded as above).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits16(v));
}

// v rounded to T and read back as float32: what storing and reloading it would give.
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(bf16_bits16(v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// The sixteen float32 lanes of an AVX-512 register as the code written once for both
// widths sees them (kvd_vec.h: exp, softmax, fused.cpp's rows); kvd_avx2.h's Vec8 is the
// same at eight lanes. Each operation is the intrinsic this header's kernels use for it.
struct Vec16 {
  using V = __m512;
  static constexpr int64_t kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  template <typename T>
  static V load(const T* p) { return load16(p); }
  template <typename T>
  static void store(T* p, V v) { store16(p, v); }
  template <typename T>
  static V round(V v) { return round16<T>(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V neg(V a) { return _mm512_sub_ps(_mm512_setzero_ps(), a); }
  static V neg_abs(V a) { return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)); }  // -|a|
  static V if_nonneg(V x, V a, V b) {  // x >= 0 ? a : b, lane by lane
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
  }
  static V nearest(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V times_pow2(V p, V n) {  // p * 2^n for integral n, by adding n to p's exponent bits
    const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
  }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static float max_of(V a) { return _mm512_reduce_max_ps(a); }
  // The first n (0..15) lanes: read from p with the others `fill`, kept with the others 0,
  // written to p.
  static __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static V load_first(const float* p, int64_t n, V fill) { return _mm512_mask_loadu_ps(fill, first(n), p); }
  static V keep_first(V a, int64_t n) { return _mm512_maskz_mov_ps(first(n), a); }
  static void store_first(float* p, int64_t n, V a) { _mm512_mask_storeu_ps(p, first(n), a); }
};

// The P . V core of both attention kernels, kR query rows at a time with their
// accumulators in registers: weigh_row adds w[r * ld] times one V row x (float32) to row
// r; store_rows writes out[r] = acc[r] / denom[r] as T.
template <int ND, int kR>
inline void weigh_row(__m512 (&acc)[kR][ND], const __m512 (&x)[ND], const float* w, int64_t ld) {
  for (int r = 0; r < kR; ++r) {
    const __m512 s = _mm512_set1_ps(w[r * ld]);
    for (int i = 0; i < ND; ++i) acc[r][i] = _mm512_fmadd_ps(s, x[i], acc[r][i]);
  }
}

template <typename T, int ND, int kR>
inline void store_rows(const __m512 (&acc)[kR][ND], const float* denom, T* const* out) {
  for (int r = 0; r < kR; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / denom[r]);
    for (int i = 0; i < ND; ++i) store16(out[r] + 16 * i, _mm512_mul_ps(acc[r][i], inv));
  }
}

}  // namespace kvd
