// paged_decode_attention: one query token per sequence against its KV blocks, on the CPU.
//
// The decode step's attention reads each sequence's K/V straight from the paged cache:
// no gather into a padded copy first (which costs a write and a second read of every
// byte). Parallel over sequences (over (sequence, kv head) when there are fewer sequences
// than threads); each task scores its query heads against the sequence's tokens, reading
// each token's K and V row once for all its kv heads, softmaxes in float32 and
// accumulates V.
//
//   out   (B, H, D)                         written, q's dtype
//   q     (B, H, D)                         float32 or bfloat16
//   cache (2, num_blocks, block_size, KVH, D) K then V, contiguous, q's dtype
// bfloat16 inputs are widened to float32 as they are read (each K and V row once for the
// query heads that share it): scores, softmax and the V accumulation are float32 either
// way, and only the output is rounded back. Where the build has AVX512-BF16 and D is a
// multiple of 32, bf16 q . k runs as vdpbf16ps (exact bf16 products, float32 sums).
//   block_table (B, max_blocks) int64; lens (B,) int64 (tokens of context, query included)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#include "kvd_vec.h"
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using kvd::exp_neg;
using kvd::widen;
using kvd::prefetch_row;
using kvd::Rows;

// q . k over a head's D values. With AVX-512 one vector accumulator and one horizontal
// sum per dot; without it 16 independent lanes the compiler vectorizes (no -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#else
  float lanes[16] = {0.f};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  for (int j = 0; j < 16; ++j) s += lanes[j];
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// bf16 q . bf16 k where the CPU has AVX512-BF16: pairs of exact bf16 products summed into
// float32 lanes (vdpbf16ps); n a multiple of 32. Called only where kDotBf16 is true.
#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;
inline float dot_bf16(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  return _mm512_reduce_add_ps(acc);
}
#else
constexpr bool kDotBf16 = false;
inline float dot_bf16(const c10::BFloat16*, const c10::BFloat16*, int64_t) { return 0.f; }
#endif

inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// A K or V row as float32: float32 rows are used in place, bfloat16 rows widened once
// into `buf` for all the query heads that read them.
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const c10::BFloat16* row, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = widen(row[i]);
  return buf;
}

template <typename T>
void attend(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
            torch::Tensor lens, double scale);

#if defined(__AVX512F__)
// The vector path, for head sizes of 64 and 128 (ND = D / 16 vectors of 16 lanes).
//
// Scores: sixteen tokens at a time, each q . k left as a vector of partial sums and the
// sixteen reduced together by `hsum16` (one transposing tree, instead of one horizontal
// sum per dot, which was most of the op). Values: the probabilities of up to 4 query
// rows of one kv head times each V row, accumulated in registers over all the tokens,
// so each V row is read once per kv head and the accumulators never go to memory.

using kvd::load16;

// Lane i of the result is the sum of a[i]'s sixteen lanes.
inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i] and a[2i+1], pairs of elements summed
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: a[4i .. 4i+3], that lane's sum of each
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // across the four 128-bit lanes
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g * L + t] = scale * q_g . k_t for the G query rows of one kv head.
template <typename T, int ND, bool BF16DOT>
void scores_vec(const T* q, int64_t G, Rows<T> k, int64_t L, float scale, float* scores) {
  constexpr int64_t kAhead = kvd::kAhead;
  Rows<T> ahead = k;
  for (int64_t t = 0; t < std::min(kAhead, L); ++t) prefetch_row<T, ND * 16>(ahead.next());
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - t0);
    const T* rows[16];
    for (int64_t j = 0; j < n; ++j) rows[j] = k.next();
    for (int64_t j = t0 + kAhead; j < std::min(t0 + kAhead + 16, L); ++j) prefetch_row<T, ND * 16>(ahead.next());
    for (int64_t j = n; j < 16; ++j) rows[j] = rows[0];  // lanes past L: computed, not stored
    const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = q + g * ND * 16;
      __m512 acc[16];
      if constexpr (BF16DOT) {
#if defined(__AVX512BF16__)
        __m512bh qv[ND / 2];
        for (int i = 0; i < ND / 2; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(qg + 32 * i);
        for (int j = 0; j < 16; ++j) {
          acc[j] = _mm512_setzero_ps();
          for (int i = 0; i < ND / 2; ++i)
            acc[j] = _mm512_dpbf16_ps(acc[j], qv[i], (__m512bh)_mm512_loadu_si512(rows[j] + 32 * i));
        }
#endif
      } else {
        __m512 qv[ND];
        for (int i = 0; i < ND; ++i) qv[i] = load16(qg + 16 * i);
        for (int j = 0; j < 16; ++j) {
          acc[j] = _mm512_mul_ps(qv[0], load16(rows[j]));
          for (int i = 1; i < ND; ++i) acc[j] = _mm512_fmadd_ps(qv[i], load16(rows[j] + 16 * i), acc[j]);
        }
      }
      _mm512_mask_storeu_ps(scores + g * L + t0, keep, _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
    }
  }
}

// out_r = sum_t p[r * L + t] * v_t / denom_r for RB query rows; p already exponentiated.
template <typename T, int ND, int RB>
void values_vec(const float* p, const float* denom, Rows<T> v, int64_t L, T* out) {
  __m512 acc[RB][ND];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < ND; ++i) acc[r][i] = _mm512_setzero_ps();
  constexpr int64_t kAhead = kvd::kAhead;
  Rows<T> ahead = v;
  for (int64_t t = 0; t < std::min(kAhead, L); ++t) prefetch_row<T, ND * 16>(ahead.next());
  for (int64_t t = 0; t < L; ++t) {
    const T* row = v.next();
    if (t + kAhead < L) prefetch_row<T, ND * 16>(ahead.next());
    __m512 x[ND];
    for (int i = 0; i < ND; ++i) x[i] = load16(row + 16 * i);
    kvd::weigh_row<ND, RB>(acc, x, p + t, L);
  }
  T* rows[RB];
  for (int r = 0; r < RB; ++r) rows[r] = out + r * ND * 16;
  kvd::store_rows<T, ND, RB>(acc, denom, rows);
}

// Rows of one kv head in groups that keep their accumulators in registers (32 zmm): up
// to 4 rows at D = 64, 2 at D = 128.
template <typename T, int ND>
void values_rows(const float* p, const float* denom, Rows<T> v, int64_t L, int64_t G, T* out) {
  constexpr int64_t kMax = ND <= 4 ? 4 : 2;
  for (int64_t r = 0; r < G;) {
    const int64_t n = std::min(kMax, G - r);
    const float* pr = p + r * L;
    T* o = out + r * ND * 16;
    if constexpr (kMax == 4) {
      if (n == 4) values_vec<T, ND, 4>(pr, denom + r, v, L, o);
      if (n == 3) values_vec<T, ND, 3>(pr, denom + r, v, L, o);
    }
    if (n == 2) values_vec<T, ND, 2>(pr, denom + r, v, L, o);
    if (n == 1) values_vec<T, ND, 1>(pr, denom + r, v, L, o);
    r += n;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// The vector path on AVX2 (eight lanes, sixteen registers), for head sizes 64 and 128 (ND =
// D / 8 vectors): the AVX-512 path's plan at half the width, under the same names, so
// `attend_vec` below serves both. Scores: eight tokens at a time, reduced together by
// `hsum8`. Values: up to kRowsMax query rows of a kv head over the V rows in column passes
// (`values_vec`), so the accumulators stay in registers and each V row is still read once
// per kv head (a pass reads its own columns of every row).

using kvd::avx2::kW;
using kvd::avx2::load8;

// scores[g * L + t] = scale * q_g . k_t for the G query rows of one kv head (no bf16 dot
// instruction on AVX2: BF16DOT is always false here).
template <typename T, int ND, bool BF16DOT>
void scores_vec(const T* q, int64_t G, Rows<T> k, int64_t L, float scale, float* scores) {
  constexpr int64_t kAhead = kvd::kAhead;
  Rows<T> ahead = k;
  for (int64_t t = 0; t < std::min(kAhead, L); ++t) prefetch_row<T, ND * kW>(ahead.next());
  for (int64_t t0 = 0; t0 < L; t0 += kW) {
    const int64_t n = std::min<int64_t>(kW, L - t0);
    const T* rows[kW];
    for (int64_t j = 0; j < n; ++j) rows[j] = k.next();
    for (int64_t j = t0 + kAhead; j < std::min(t0 + kAhead + kW, L); ++j) prefetch_row<T, ND * kW>(ahead.next());
    for (int64_t j = n; j < kW; ++j) rows[j] = rows[0];  // lanes past L: computed, not stored
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = q + g * ND * kW;
      __m256 acc[kW];
      const __m256 q0 = load8(qg);
      for (int j = 0; j < kW; ++j) acc[j] = _mm256_mul_ps(q0, load8(rows[j]));
      for (int i = 1; i < ND; ++i) {
        const __m256 qv = load8(qg + kW * i);
        for (int j = 0; j < kW; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(rows[j] + kW * i), acc[j]);
      }
      _mm256_maskstore_ps(scores + g * L + t0, kvd::avx2::first_lanes(n),
                          _mm256_mul_ps(kvd::avx2::hsum8(acc), _mm256_set1_ps(scale)));
    }
  }
}

// out_r = sum_t p[r * L + t] * v_t / denom_r for R query rows, NC vectors of columns a pass:
// four (two cache lines of a float32 row) up to three rows, whose 12 accumulators leave the
// V row to memory operands where registers run out; two at four rows. Four against two
// columns at three rows, the two builds interleaved in one process: 12-25% less time at
// batch 1 to 64 and 300 to 1,000 tokens, in both dtypes (half the passes over the blocks).
template <typename T, int ND, int R>
void values_vec(const float* p, const float* denom, Rows<T> v, int64_t L, T* out) {
  constexpr int NC = R <= 3 ? 4 : 2;
  for (int c = 0; c < ND; c += NC) {
    __m256 acc[R][NC];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NC; ++i) acc[r][i] = _mm256_setzero_ps();
    Rows<T> rows = v, ahead = v;
    for (int64_t t = 0; t < std::min(kvd::kAhead, L); ++t) prefetch_row<T, NC * kW>(ahead.next() + c * kW);
    for (int64_t t = 0; t < L; ++t) {
      if (t + kvd::kAhead < L) prefetch_row<T, NC * kW>(ahead.next() + c * kW);
      kvd::avx2::weigh_cols<NC, R>(acc, rows.next() + c * kW, p + t, L);
    }
    T* o[R];
    for (int r = 0; r < R; ++r) o[r] = out + r * ND * kW + c * kW;
    kvd::avx2::store_cols<T, NC, R>(acc, denom, o);
  }
}

constexpr int64_t kRowsMax = 4;  // at 4 rows x 2 vectors: 8 accumulators, 2 of V, 1 weight

template <typename T, int ND>
void values_rows(const float* p, const float* denom, Rows<T> v, int64_t L, int64_t G, T* out) {
  for (int64_t r = 0; r < G;) {
    const int64_t n = std::min(kRowsMax, G - r);
    const float* pr = p + r * L;
    T* o = out + r * ND * kW;
    if (n == 4) values_vec<T, ND, 4>(pr, denom + r, v, L, o);
    if (n == 3) values_vec<T, ND, 3>(pr, denom + r, v, L, o);
    if (n == 2) values_vec<T, ND, 2>(pr, denom + r, v, L, o);
    if (n == 1) values_vec<T, ND, 1>(pr, denom + r, v, L, o);
    r += n;
  }
}
#endif

#if defined(KVD_VEC)
constexpr int64_t kLanes = kvd::Vec::kLanes;  // float32 lanes of a vector (16 or 8)

template <typename T, int ND>
void attend_vec(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
                torch::Tensor lens, double scale);
#endif

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache,
                            torch::Tensor block_table, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be (B, H, D) of one shape");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, "cache must be (2, num_blocks, block_size, KVH, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && cache.scalar_type() == dt && out.scalar_type() == dt,
              "paged_decode_attention: q, cache and out must all be float32 or all bfloat16");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && cache.is_contiguous() && block_table.is_contiguous() &&
                  lens.is_contiguous(), "contiguous tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "head sizes disagree");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && lens.size(0) == B, "one table row per sequence");
  const int64_t MB = block_table.size(1);
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= MB * BS, "lens[", b, "] = ", len[b], " outside [1, ", MB * BS, "]");
    for (int64_t i = 0; i < (len[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(table[b * MB + i] >= 0 && table[b * MB + i] < NB, "block id out of range");
  }
#if defined(KVD_VEC)
  if (D == 64 || D == 128) {
    constexpr int n64 = 64 / kLanes, n128 = 128 / kLanes;  // vectors per head
    if (dt == at::kFloat)
      D == 64 ? attend_vec<float, n64>(out, q, cache, block_table, lens, scale)
              : attend_vec<float, n128>(out, q, cache, block_table, lens, scale);
    else
      D == 64 ? attend_vec<c10::BFloat16, n64>(out, q, cache, block_table, lens, scale)
              : attend_vec<c10::BFloat16, n128>(out, q, cache, block_table, lens, scale);
    return;
  }
#endif
  if (dt == at::kFloat)
    attend<float>(out, q, cache, block_table, lens, scale);
  else
    attend<c10::BFloat16>(out, q, cache, block_table, lens, scale);
}

namespace {

using kvd::exp_neg;
using kvd::widen;

template <typename T>
void attend(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
            torch::Tensor lens, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3);
  const int64_t MB = block_table.size(1), G = H / KVH;
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  const T* kp = cache.data_ptr<T>();
  const T* vp = kp + NB * BS * KVH * D;
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  const int64_t tok_stride = KVH * D;
  const bool native_bf16 = std::is_same_v<T, c10::BFloat16> && kDotBf16 && D % 32 == 0;

  // A task is one sequence, all its kv heads: a token's K (and V) row of every head is one
  // contiguous run, read once. With fewer sequences than threads, a task is (sequence,
  // kv head) instead, so a single stream still uses every core.
  const int64_t split = B < at::get_num_threads() ? KVH : 1;
  const int64_t heads_per_task = KVH / split;
  const int64_t R = heads_per_task * G;  // query rows of a task
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(R * D), acc(R * D), denom(R), row(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split, kh0 = (task % split) * heads_per_task, L = len[b];
      scores.resize(R * L);
      const T* qb = qp + (b * H + kh0 * G) * D;  // the query heads of kv heads kh0 ... in order
      if (!native_bf16)  // the bf16 dot reads q as it is
        for (int64_t i = 0; i < R * D; ++i) qf[i] = widen(qb[i]);
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += BS, ++blk) {
        const int64_t n = std::min(BS, L - t0);
        const T* k = kp + table[b * MB + blk] * BS * tok_stride + kh0 * D;
        for (int64_t o = 0; o < n; ++o)
          for (int64_t h = 0; h < heads_per_task; ++h) {
            const T* krow = k + o * tok_stride + h * D;
            float* sc = scores.data() + h * G * L + t0 + o;  // row r = h * G + g at sc[g * L]
            if constexpr (std::is_same_v<T, c10::BFloat16>) {
              if (native_bf16) {
                for (int64_t g = 0; g < G; ++g) sc[g * L] = dot_bf16(qb + (h * G + g) * D, krow, D) * fscale;
                continue;
              }
            }
            const float* kf = as_float(krow, D, row.data());
            for (int64_t g = 0; g < G; ++g) sc[g * L] = dot(qf.data() + (h * G + g) * D, kf, D) * fscale;
          }
      }
      for (int64_t r = 0; r < R; ++r) {
        float* sc = scores.data() + r * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sc[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) sc[t] = exp_neg(sc[t] - m);
        for (int64_t t = 0; t < L; ++t) sum += sc[t];
        denom[r] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += BS, ++blk) {
        const int64_t n = std::min(BS, L - t0);
        const T* v = vp + table[b * MB + blk] * BS * tok_stride + kh0 * D;
        for (int64_t o = 0; o < n; ++o)
          for (int64_t h = 0; h < heads_per_task; ++h) {
            const float* vf = as_float(v + o * tok_stride + h * D, D, row.data());
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = h * G + g;
              axpy(acc.data() + r * D, scores[r * L + t0 + o], vf, D);
            }
          }
      }
      for (int64_t r = 0; r < R; ++r) {
        T* o = op + (b * H + kh0 * G + r) * D;
        const float inv = 1.f / denom[r];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv);
      }
    }
  });
}

#if defined(KVD_VEC)
using kvd::softmax_row;

// The vector path over the build's lanes (kLanes: AVX-512 or AVX2, the pieces above).
template <typename T, int ND>
void attend_vec(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
                torch::Tensor lens, double scale) {
  constexpr int64_t D = ND * kLanes;
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3);
  const int64_t MB = block_table.size(1), G = H / KVH;
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  const T* kp = cache.data_ptr<T>();
  const T* vp = kp + NB * BS * KVH * D;
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  const int64_t tok_stride = KVH * D, block_elems = BS * tok_stride;
  constexpr bool bf16dot = std::is_same_v<T, c10::BFloat16> && kDotBf16;

  // Tasks as in `attend`: a sequence, or a (sequence, kv head) when sequences are fewer than threads.
  const int64_t split = B < at::get_num_threads() ? KVH : 1;
  const int64_t heads_per_task = KVH / split;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, denom(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split, kh0 = (task % split) * heads_per_task, L = len[b];
      p.resize(G * L);
      for (int64_t kh = kh0; kh < kh0 + heads_per_task; ++kh) {
        const T* qh = qp + (b * H + kh * G) * D;
        Rows<T> k{kp + kh * D, table + b * MB, BS, block_elems, tok_stride};
        Rows<T> v{vp + kh * D, table + b * MB, BS, block_elems, tok_stride};
        scores_vec<T, ND, bf16dot>(qh, G, k, L, fscale, p.data());
        for (int64_t g = 0; g < G; ++g) denom[g] = softmax_row(p.data() + g * L, L);
        values_rows<T, ND>(p.data(), denom.data(), v, L, G, op + (b * H + kh * G) * D);
      }
    }
  });
}
#endif

}  // namespace

// fused.cpp
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps);
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
void rope_neox(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin);
void rope_neox_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor cache, torch::Tensor slots);
void silu_and_mul(torch::Tensor out, torch::Tensor x);
// prefill_attention.cpp
bool prefill_attention_supported(int64_t head_dim);
void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
                       int64_t num_computed, double scale);
// sampling.cpp
void sample_rows(torch::Tensor x, torch::Tensor temperature, torch::Tensor kth, torch::Tensor min_p,
                 torch::Tensor top_p, torch::Tensor uniform, torch::Tensor tokens, torch::Tensor threshold);
// quant_linear.cpp
void quant_linear(torch::Tensor out, torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m,
                  int64_t kind, bool int_dot, int64_t isa);
std::vector<int64_t> quant_isas();
void quant_dequantize(torch::Tensor out, torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t kind,
                      torch::Tensor rows);
// decode_layers.cpp
void register_decode_layers(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV (CPU, float32 or bfloat16)");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight, row by row (transformers' rounding)");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; x = RMSNorm(residual) * weight, in place");
  m.def("rope_neox", &rope_neox, "rotary embedding of q and k in place (rotate-half form)");
  m.def("rope_neox_cache", &rope_neox_cache, "rope_neox, and each token's k and v written into its cache slot");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(x[:, :I]) * x[:, I:]");
  m.def("prefill_attention_supported", &prefill_attention_supported, "whether this build has prefill_attention for a head size");
  m.def("prefill_attention", &prefill_attention, "a prefill chunk's causal attention over its paged KV (CPU)");
  m.def("quant_linear", &quant_linear, "out = x . W^T with W in Q8_0 / Q4_0 / Q4_1 blocks, columns tiled by 16 (CPU)");
  m.def("quant_isas", &quant_isas, "quant_linear's paths in this build: 0 scalar, 1 AVX2, 2 AVX2+VNNI, 3 AVX-512, 4 AVX-512+VNNI");
  m.def("quant_dequantize", &quant_dequantize, "the float32 weights of the given columns of a quantized W");
  register_decode_layers(m);  // DecodeLayers: a decode step's layers on quantized weights in one call
  m.def("sample_rows", &sample_rows, "sampled rows: exp, min-p/top-k/top-p threshold and draw, without a sort (CPU)");
}
