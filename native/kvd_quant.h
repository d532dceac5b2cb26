// The vector kernels of quant_linear.cpp: one tile of a quantized matrix's columns against
// a few activation rows, written once over a vector type and built for each instruction set
// the compiler has (AVX2, AVX2 + VNNI, AVX-512, AVX-512 + VNNI), so that one build holds
// every path and a test can run each.
//
// The tiled layout (kvd/worker/quant.py repacks GGUF's into it at load, byte for byte):
// columns in tiles of kTile = 16 (the last tile holds the N % 16 left over, `width` < 16);
// a tile's blocks one after another, and in a block its quant bytes as G groups of four
// (G = 8 for Q8_0's 32 bytes, 4 for Q4's 16), each group one 32-bit word per column:
//
//   tile t at qs + 16 t nb qb; block b at + b width qb; group g at + g width 4; column c at + 4 c
//   scales: d (and m) at + 16 t nb, then b width + c (float16)
//
// Group g of a column is GGUF's block bytes 4g..4g+3 (Q4: low nibbles weights 4g..4g+3,
// high nibbles weights 16+4g..), so a 32-bit lane of a vector load is one column and a
// vpdpbusd against one activation word broadcast adds four products to each of 16 (AVX-512)
// or 8 (AVX2) columns at once. The column scales load as one vector and apply per block
// with no horizontal sum; each weight vector loaded serves every row of the batch.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "kvd_math.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVD_Q_AVX2 1
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define KVD_Q_AVX2_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KVD_Q_AVX512 1
#if defined(__AVX512VNNI__)
#define KVD_Q_AVX512_VNNI 1
#endif
#endif
#endif

// The float halves of the traits below are the other kernels' Vec8 and Vec16.
#if defined(KVD_Q_AVX2)
#include "kvd_avx2.h"
#endif
#if defined(KVD_Q_AVX512)
#include "kvd_simd.h"
#endif

namespace kvd::quant {

enum Kind : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
constexpr int64_t kBlock = 32;
constexpr int kTile = 16;  // columns a tile
constexpr int kMaxGroups = 8;

constexpr int64_t quant_bytes(int64_t kind) { return kind == kQ8_0 ? kBlock : kBlock / 2; }
constexpr int groups(int64_t kind) { return static_cast<int>(quant_bytes(kind) / 4); }

// One full tile (or a zero-padded copy of the short last one): kTile columns' groups.
struct Tile {
  const uint8_t* q;
  const at::Half* d;
  const at::Half* m;  // Q4_1 only
};

// Activation rows quantized per block of 32: row r's bytes at q + r K (int8; for the Q8_0
// VNNI path int8 + 128 as uint8), scale da[r nb + b], and sa = da * sum(q) for the m term.
struct Acts {
  const int8_t* q;
  const float* da;
  const float* sa;
  int64_t K, nb;
};

// The integer half of a path's vector operations, beside the float half it inherits (the
// other kernels' Vec8 / Vec16: zero, set1, load of float32 or bfloat16, mul, fmadd, store).
#if defined(KVD_Q_AVX2)
// Eight columns a vector (AVX2's 16 registers: up to 4 rows live beside a block's weights).
template <bool kVnni>
struct Ymm : kvd::avx2::Vec8 {
  using I = __m256i;
  static constexpr int kCols = 8, kRows = 4;
  static constexpr bool kHasVnni = kVnni;
  static I iload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static I izero() { return _mm256_setzero_si256(); }
  // each byte's nibble at `shift` (0 or 4); nibble32: the 32-bit lane's at `shift`, alone
  static I nibbles(I x, int shift) { return _mm256_and_si256(_mm256_srli_epi32(x, shift), _mm256_set1_epi8(0x0F)); }
  static I nibble32(I x, int shift) { return _mm256_and_si256(_mm256_srli_epi32(x, shift), _mm256_set1_epi32(0x0F)); }
  static I byte_s(I v, int j) { return _mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * j), 24); }  // signed byte j
  // acc + per 32-bit lane the sum of four u8 * s8 products. maddubs saturates its int16
  // pairs at 2 * 255 * 127; the callers keep the unsigned side at most 127 there.
  static I dot(I acc, I u, I s) {
#if defined(KVD_Q_AVX2_VNNI)
    if constexpr (kVnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      return _mm256_dpbusd_epi32(acc, u, s);
#else
      return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
    }
#endif
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  static I abs8(I w) { return _mm256_abs_epi8(w); }
  static I sign8(I a, I w) { return _mm256_sign_epi8(a, w); }  // a negated where w < 0, 0 where w = 0
  static I times_neg128(I s) { return _mm256_sub_epi32(izero(), _mm256_slli_epi32(s, 7)); }
  static I ones8() { return _mm256_set1_epi8(1); }
  static V cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static V halves(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // 32 values at x as int8 steps of max|x| / 127 (nearest, ties to even, as std::nearbyint)
  template <typename T>
  static void quantize32(const T* x, int8_t* q, bool biased, float& da, float& sa) {
    V v[4];
    V amax = zero();
    for (int i = 0; i < 4; ++i) {
      v[i] = load(x + 8 * i);
      amax = max(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
    }
    const float mx = max_of(amax);
    const V inv = set1(mx > 0.f ? 127.f / mx : 0.f);
    I iv[4];
    for (int i = 0; i < 4; ++i) iv[i] = _mm256_cvtps_epi32(mul(v[i], inv));
    const I sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // packs narrow within 128-bit halves: the permute puts the 32-bit groups back in order
    const I p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    I b = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (biased) b = _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(0x80)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b);
    da = mx / 127.f;
    sa = da * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
};
#endif

#if defined(KVD_Q_AVX512)
// A whole tile a vector (32 registers: 8 rows live beside a block's 8 weight vectors).
template <bool kVnni>
struct Zmm : kvd::Vec16 {
  using I = __m512i;
  static constexpr int kCols = 16, kRows = 8;
  static constexpr bool kHasVnni = kVnni;
  static I iload(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I izero() { return _mm512_setzero_si512(); }
  static I nibbles(I x, int shift) { return _mm512_and_si512(_mm512_srli_epi32(x, shift), _mm512_set1_epi8(0x0F)); }
  static I nibble32(I x, int shift) { return _mm512_and_si512(_mm512_srli_epi32(x, shift), _mm512_set1_epi32(0x0F)); }
  static I byte_s(I v, int j) { return _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24); }
  static I dot(I acc, I u, I s) {
#if defined(KVD_Q_AVX512_VNNI)
    if constexpr (kVnni) return _mm512_dpbusd_epi32(acc, u, s);
#endif
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
  }
  static I abs8(I w) { return _mm512_abs_epi8(w); }
  static I sign8(I a, I w) { return _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), izero(), a); }
  static I times_neg128(I s) { return _mm512_sub_epi32(izero(), _mm512_slli_epi32(s, 7)); }
  static I ones8() { return _mm512_set1_epi8(1); }
  static V cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static V halves(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <typename T>
  static void quantize32(const T* x, int8_t* q, bool biased, float& da, float& sa) {
    const V v0 = load(x), v1 = load(x + 16);
    const float mx = max_of(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const V inv = set1(mx > 0.f ? 127.f / mx : 0.f);
    const I i0 = _mm512_cvtps_epi32(mul(v0, inv)), i1 = _mm512_cvtps_epi32(mul(v1, inv));
    __m128i b0 = _mm512_cvtepi32_epi8(i0), b1 = _mm512_cvtepi32_epi8(i1);
    if (biased) {
      b0 = _mm_xor_si128(b0, _mm_set1_epi8(static_cast<char>(0x80)));
      b1 = _mm_xor_si128(b1, _mm_set1_epi8(static_cast<char>(0x80)));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), b0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), b1);
    da = mx / 127.f;
    sa = da * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
  }
};
#endif

// Block b of a tile into L1: its quant bytes (64 G, whole lines) and scales.
template <int64_t kKind>
inline void prefetch_block(const Tile& t, int64_t b) {
  constexpr int kBytes = kTile * 4 * groups(kKind);
  prefetch_row<uint8_t, kBytes>(t.q + b * kBytes);
  prefetch_row<at::Half, kTile>(t.d + b * kTile);
  if constexpr (kKind == kQ4_1) prefetch_row<at::Half, kTile>(t.m + b * kTile);
}

// The block's column scales of this part of the tile: d, and the term per unit of the
// activations' block sum (Q4_1: m; Q4_0: -8 d, its quants being q - 8; Q8_0: none).
template <class S, int64_t kKind>
inline void block_scales(const Tile& t, int64_t b, int part, typename S::V& d, typename S::V& mn) {
  const int64_t at = b * kTile + part * S::kCols;
  d = S::halves(t.d + at);
  if constexpr (kKind == kQ4_1) mn = S::halves(t.m + at);
  if constexpr (kKind == kQ4_0) mn = S::mul(d, S::set1(-8.f));
}

// Rows [r0, r0 + R) against the S::kCols columns `part` of tile t, all nb blocks, integer
// dots: out[r * ldo + c] = sum over blocks of d da dot(q, a) + mn sa. Each block's weights
// are loaded and unpacked once, then serve the R rows from registers. `next`, where given,
// is the tile this thread takes after t: its blocks are prefetched one by one as t's are
// computed (with 16-32 rows the hardware prefetcher alone had left a matrix larger than the
// cache at half speed).
template <class S, int64_t kKind, int R>
void tile_int(const Tile& t, int part, const Acts& a, int64_t r0, float* out, int64_t ldo, const Tile* next) {
  using I = typename S::I;
  using V = typename S::V;
  constexpr int G = groups(kKind);
  // Q8_0's weights are signed, and vpdpbusd's unsigned side must be the activations': they
  // arrive + 128, and each column's block sum of weights times 128 is taken back off
  constexpr bool kBiased = kKind == kQ8_0 && S::kHasVnni;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = S::zero();
  const uint8_t* q = t.q + part * S::kCols * 4;
  for (int64_t b = 0; b < a.nb; ++b, q += kTile * 4 * G) {
    I w[kMaxGroups];  // w[g]: weights 4g..4g+3 of each column, one 32-bit lane a column
    if constexpr (kKind == kQ8_0) {
      for (int g = 0; g < 8; ++g) w[g] = S::iload(q + g * kTile * 4);
    } else {
      for (int g = 0; g < 4; ++g) {
        const I x = S::iload(q + g * kTile * 4);
        w[g] = S::nibbles(x, 0);
        w[g + 4] = S::nibbles(x, 4);
      }
    }
    V d, mn;
    block_scales<S, kKind>(t, b, part, d, mn);
    if (next != nullptr) prefetch_block<kKind>(*next, b);
    I bias = S::izero();
    if constexpr (kBiased) {
      for (int g = 0; g < 8; ++g) bias = S::dot(bias, S::ones8(), w[g]);
      bias = S::times_neg128(bias);
    }
    // unrolled, so that the R accumulators stay in registers (GCC kept them on the stack)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = a.q + (r0 + r) * a.K + b * kBlock;
      I s = bias;
      for (int g = 0; g < 8; ++g) {
        const I av = S::bcast4(ar + 4 * g);
        if constexpr (kKind != kQ8_0)
          s = S::dot(s, w[g], av);  // quants 0..15 unsigned, activations signed
        else if constexpr (kBiased)
          s = S::dot(s, av, w[g]);
        else  // maddubs: |w| unsigned, w's sign moved onto the activation
          s = S::dot(s, S::abs8(w[g]), S::sign8(av, w[g]));
      }
      const int64_t ab = (r0 + r) * a.nb + b;
      acc[r] = S::fmadd(S::cvt(s), S::mul(d, S::set1(a.da[ab])), acc[r]);
      if constexpr (kKind != kQ8_0) acc[r] = S::fmadd(mn, S::set1(a.sa[ab]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) S::store(out + r * ldo, acc[r]);
}

// The same tile with float activations x (row r at x + (r0 + r) ldx): each weight widened
// to float once, d q + m as a vector over the columns, then one FMA a row (an outer product).
template <class S, int64_t kKind, int R>
void tile_float(const Tile& t, int part, const float* x, int64_t ldx, int64_t nb, int64_t r0, float* out,
                int64_t ldo) {
  using I = typename S::I;
  using V = typename S::V;
  constexpr int G = groups(kKind);
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = S::zero();
  const uint8_t* q = t.q + part * S::kCols * 4;
  for (int64_t b = 0; b < nb; ++b, q += kTile * 4 * G) {
    V d, mn;
    block_scales<S, kKind>(t, b, part, d, mn);
    for (int g = 0; g < G; ++g) {
      const I raw = S::iload(q + g * kTile * 4);
      for (int half = 0; half < (kKind == kQ8_0 ? 1 : 2); ++half) {
        const int64_t k0 = b * kBlock + 4 * g + 16 * half;
        for (int j = 0; j < 4; ++j) {
          V wf;
          if constexpr (kKind == kQ8_0)
            wf = S::mul(S::cvt(S::byte_s(raw, j)), d);
          else
            wf = S::fmadd(S::cvt(S::nibble32(raw, 8 * j + 4 * half)), d, mn);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) acc[r] = S::fmadd(wf, S::set1(x[(r0 + r) * ldx + k0 + j]), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) S::store(out + r * ldo, acc[r]);
}

}  // namespace kvd::quant
