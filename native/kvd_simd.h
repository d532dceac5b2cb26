// kvd's AVX-512 building blocks, shared by the kernels (included only where the build has
// __AVX512F__; kvd_avx2.h holds the same at eight lanes): bf16 widening and rounding, exp,
// softmax and the P . V core.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "kvd_math.h"

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

// exp_neg (kvd_math.h) on sixteen lanes: the same steps and constants.
inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLowest));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// sc[t] = e^(sc[t] - max) over a row of L scores; returns their sum. Sixteen lanes at a
// time: a scalar max and sum are chains of dependent adds, which had cost more than the dots.
inline float softmax_row(float* sc, int64_t L) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = lowest;
  int64_t t = 0;
  for (; t + 16 <= L; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sc + t));
  const __mmask16 tail = static_cast<__mmask16>((1u << (L - t)) - 1);
  m = _mm512_max_ps(m, _mm512_mask_loadu_ps(lowest, tail, sc + t));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t + 16 <= L; t += 16) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(sc + t), mx));
    _mm512_storeu_ps(sc + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_mask_loadu_ps(mx, tail, sc + t), mx));
    _mm512_mask_storeu_ps(sc + t, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(sum);
}

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
