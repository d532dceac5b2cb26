// Weight-only quantized linear layers on the CPU: out (M, N) = x (M, K) . W^T, with W held
// as GGUF-style blocks of 32 weights along K, never as float32.
//
//   kind 0  Q8_0  w = d * q          q int8,  d f16   (34 bytes per block)
//   kind 1  Q4_0  w = d * (q - 8)    q 0..15, d f16   (18 bytes)
//   kind 2  Q4_1  w = d * q + m      q 0..15, d, m f16 (20 bytes)
//
// Storage, one row of blocks per output column n: qs (N, K/32 * 16) uint8 nibbles for Q4 (byte
// j holds weight j in its low nibble and weight j + 16 in its high one, GGUF's order), (N, K)
// int8 for Q8_0; d and m (N, K/32) float16. Scales apart from the quants, so the 16 or 32
// quant bytes of a block are one aligned-size load.
//
//   quant_linear(out, x, qs, d, m, kind, int_dot)
//       int_dot: x is quantized per block of 32 to int8 (scale max|x| / 127, as llama.cpp's
//       Q8_0 activations) and each block's dot is integer (VNNI dpbusd where the build has
//       it, maddubs + madd elsewhere), scaled once per block. Otherwise every weight is
//       widened to float in registers and multiplied by x in float (no activation rounding).
//   quant_dequantize(out, qs, d, m, kind, rows)
//       out[i] = the float32 weights of column rows[i] (the embedding lookup, and the
//       prefill path's tiles for a float GEMM).
//
// Decode reads each weight byte once per call: a column's blocks (a few hundred bytes) stay
// in L1 while every tile of activation rows passes over them. Columns run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVD_QUANT_VEC 1
#endif

namespace {

enum Kind : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
constexpr int64_t kBlock = 32;

inline int64_t quant_bytes(int64_t kind) { return kind == kQ8_0 ? kBlock : kBlock / 2; }

inline float h2f(const at::Half h) {
#if defined(KVD_QUANT_VEC)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// The weights' view the kernels take: raw pointers and strides of one quantized matrix.
struct QWeights {
  const uint8_t* qs;
  const at::Half* d;
  const at::Half* m;  // Q4_1 only
  int64_t kind, nb, row_bytes;  // blocks per column, quant bytes per column
};

// m of block b of column n: the term added per unit of the block's activation sum.
inline float block_min(const QWeights& w, int64_t n, int64_t b, float dw) {
  if (w.kind == kQ4_1) return h2f(w.m[n * w.nb + b]);
  return w.kind == kQ4_0 ? -8.f * dw : 0.f;
}

// Activations quantized per block: q int8, scale da, and sa = da * sum(q) for the m term.
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> da, sa;
};

template <typename T>
void quantize_acts(const T* x, int64_t ldx, int64_t M, int64_t K, QActs& a) {
  const int64_t nb = K / kBlock;
  a.q.resize(M * K);
  a.da.resize(M * nb);
  a.sa.resize(M * nb);
  at::parallel_for(0, M, 8, [&](int64_t r0, int64_t r1) {
    float v[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + r * ldx + b * kBlock;
        float amax = 0.f;
        for (int i = 0; i < kBlock; ++i) {
          v[i] = static_cast<float>(src[i]);
          amax = std::max(amax, std::fabs(v[i]));
        }
        const float da = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* q = a.q.data() + r * K + b * kBlock;
        int sum = 0;
        for (int i = 0; i < kBlock; ++i) {
          q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
          sum += q[i];
        }
        a.da[r * nb + b] = da;
        a.sa[r * nb + b] = da * static_cast<float>(sum);
      }
    }
  });
}

#if defined(KVD_QUANT_VEC)
// A block's 32 weights as bytes in order: Q4 nibbles unpacked (0..15), Q8_0 as stored.
inline __m256i load_block(const QWeights& w, const uint8_t* p) {
  if (w.kind == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
  return _mm256_set_m128i(hi, lo);
}

// Eight int32 lanes, each the sum of four u8 * s8 products. maddubs saturates its int16 pairs
// at 2 * 255 * 127; the unsigned side here is at most 128, so it never does.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Columns [n, n + C) against activation rows [r0, r0 + R), integer dots: each block's
// weights are loaded and unpacked once for the R rows (R * C accumulators in registers).
template <int R, int C>
void tile_int(const QWeights& w, int64_t n, const QActs& a, int64_t r0, int64_t K, float* out, int64_t ldo) {
  __m256 acc[R][C];
  float accm[R][C] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t nb = w.nb, qb = quant_bytes(w.kind);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wu[C], wv[C];
    float dw[C], mw[C];
    for (int c = 0; c < C; ++c) {
      wv[c] = load_block(w, w.qs + (n + c) * w.row_bytes + b * qb);
      // Q8_0 is signed: |w| goes to the unsigned operand and w's sign onto the activation
      wu[c] = w.kind == kQ8_0 ? _mm256_sign_epi8(wv[c], wv[c]) : wv[c];
      dw[c] = h2f(w.d[(n + c) * nb + b]);
      mw[c] = block_min(w, n + c, b, dw[c]);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t ab = (r0 + r) * nb + b;
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + (r0 + r) * K + b * kBlock));
      const float da = a.da[ab], sa = a.sa[ab];
      for (int c = 0; c < C; ++c) {
        const __m256i s = w.kind == kQ8_0 ? _mm256_sign_epi8(av, wv[c]) : av;
        const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(wu[c], s));
        acc[r][c] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw[c] * da), acc[r][c]);
        accm[r][c] += mw[c] * sa;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[(r0 + r) * ldo + n + c] = hsum(acc[r][c]) + accm[r][c];
}

// Eight weights of a block as float: bytes [8 i, 8 i + 8) of the unpacked block, d * q + m.
inline __m256 widen8(const QWeights& w, __m256i q, int i, __m256 d, __m256 m) {
  const __m128i half = i < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  const __m128i part = (i & 1) ? _mm_srli_si128(half, 8) : half;
  const __m256i q32 = w.kind == kQ8_0 ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q32), d, m);
}

// The same tile with every weight widened to float and float activations (xf, row-major K).
template <int R, int C>
void tile_float(const QWeights& w, int64_t n, const float* xf, int64_t r0, int64_t K, float* out, int64_t ldo) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t nb = w.nb, qb = quant_bytes(w.kind);
  for (int64_t b = 0; b < nb; ++b) {
    for (int c = 0; c < C; ++c) {
      const __m256i q = load_block(w, w.qs + (n + c) * w.row_bytes + b * qb);
      const float dw = h2f(w.d[(n + c) * nb + b]);
      const __m256 d = _mm256_set1_ps(dw), m = _mm256_set1_ps(block_min(w, n + c, b, dw));
      for (int i = 0; i < 4; ++i) {
        const __m256 wf = widen8(w, q, i, d, m);
        for (int r = 0; r < R; ++r)
          acc[r][c] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(xf + (r0 + r) * K + b * kBlock + 8 * i), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[(r0 + r) * ldo + n + c] = hsum(acc[r][c]);
}

// All rows against columns [n0, n1): C columns at a time, rows in tiles of up to 4 (AVX2's
// sixteen registers hold 4 x 2 accumulators beside the weights), leftover columns one by one.
template <bool kInt>
void columns(const QWeights& w, const QActs& a, const float* xf, int64_t M, int64_t K, int64_t n0, int64_t n1,
             float* out, int64_t ldo) {
  auto run = [&](auto rows, auto cols, int64_t n, int64_t r0) {
    constexpr int R = decltype(rows)::value, C = decltype(cols)::value;
    if constexpr (kInt)
      tile_int<R, C>(w, n, a, r0, K, out, ldo);
    else
      tile_float<R, C>(w, n, xf, r0, K, out, ldo);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  auto rows_of = [&](auto cols, int64_t n) {
    if (M == 1) {
      run(I1{}, cols, n, 0);
      return;
    }
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) run(I4{}, cols, n, r);
    switch (M - r) {
      case 3: run(I3{}, cols, n, r); break;
      case 2: run(I2{}, cols, n, r); break;
      case 1: run(I1{}, cols, n, r); break;
      default: break;
    }
  };
  int64_t n = n0;
  if (M == 1) {  // one row: four columns give four independent FMA chains
    for (; n + 4 <= n1; n += 4) rows_of(I4{}, n);
  } else {
    for (; n + 2 <= n1; n += 2) rows_of(I2{}, n);
  }
  for (; n < n1; ++n) rows_of(I1{}, n);
}
#endif

// The scalar code: the same sums, one weight at a time (builds without AVX2, FMA and F16C).
float weight_at(const QWeights& w, int64_t n, int64_t k) {
  const int64_t b = k / kBlock, j = k % kBlock;
  const float dw = h2f(w.d[n * w.nb + b]);
  const uint8_t* blk = w.qs + n * w.row_bytes + b * quant_bytes(w.kind);
  if (w.kind == kQ8_0) return dw * static_cast<float>(static_cast<int8_t>(blk[j]));
  const int q = j < 16 ? blk[j] & 0x0F : blk[j - 16] >> 4;
  return dw * static_cast<float>(q) + block_min(w, n, b, dw);
}

void columns_scalar(const QWeights& w, const float* xf, int64_t M, int64_t K, int64_t n0, int64_t n1, float* out,
                    int64_t ldo) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < M; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += weight_at(w, n, k) * xf[r * K + k];
      out[r * ldo + n] = s;
    }
}

QWeights check_weights(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m, int64_t kind,
                       int64_t K, const char* op) {
  TORCH_CHECK(kind == kQ8_0 || kind == kQ4_0 || kind == kQ4_1, op, ": kind must be 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1)");
  TORCH_CHECK(K % kBlock == 0, op, ": in_features ", K, " is not a multiple of 32");
  const int64_t nb = K / kBlock, N = qs.size(0);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == nb * quant_bytes(kind),
              op, ": qs must be contiguous uint8 (N, ", nb * quant_bytes(kind), ")");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == N * nb, op,
              ": d must be contiguous float16 (N, K/32)");
  if (kind == kQ4_1)
    TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.numel() == N * nb, op,
                ": m must be contiguous float16 (N, K/32) for Q4_1");
  return {qs.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), kind == kQ4_1 ? m.data_ptr<at::Half>() : nullptr, kind,
          nb, nb * quant_bytes(kind)};
}

}  // namespace

void quant_linear(torch::Tensor out, torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m,
                  int64_t kind, bool int_dot) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quant_linear: x must be 2-D with contiguous rows");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "quant_linear: x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  const QWeights w = check_weights(qs, d, m, kind, K, "quant_linear");
  const int64_t N = qs.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N && out.is_contiguous() && out.scalar_type() == dt,
              "quant_linear: out must be contiguous (M, N) of x's dtype");
  // float32 results go straight into out; bfloat16 ones through a float buffer, rounded once
  torch::Tensor acc = dt == at::kFloat ? out : torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* o = acc.data_ptr<float>();
  torch::Tensor xf;
  QActs a;
#if defined(KVD_QUANT_VEC)
  if (int_dot) {
    if (dt == at::kFloat)
      quantize_acts(x.data_ptr<float>(), x.stride(0), M, K, a);
    else
      quantize_acts(x.data_ptr<c10::BFloat16>(), x.stride(0), M, K, a);
  }
#else
  int_dot = false;
#endif
  if (!int_dot) xf = x.to(at::kFloat).contiguous();
  const float* xp = int_dot ? nullptr : xf.data_ptr<float>();
  // Grain: enough columns that a thread's share is worth waking it for (about 64 KiB of quants)
  const int64_t grain = std::max<int64_t>(8, (64 << 10) / std::max<int64_t>(1, w.row_bytes));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if defined(KVD_QUANT_VEC)
    if (int_dot)
      columns<true>(w, a, xp, M, K, n0, n1, o, N);
    else
      columns<false>(w, a, xp, M, K, n0, n1, o, N);
#else
    columns_scalar(w, xp, M, K, n0, n1, o, N);
#endif
  });
  if (dt != at::kFloat) out.copy_(acc);
}

void quant_dequantize(torch::Tensor out, torch::Tensor qs, torch::Tensor d, torch::Tensor m, int64_t kind,
                      torch::Tensor rows) {
  const int64_t K = out.size(1);
  const QWeights w = check_weights(qs, d, m, kind, K, "quant_dequantize");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "quant_dequantize: out must be contiguous float32 (R, K)");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.size(0) == out.size(0),
              "quant_dequantize: rows must be (R,) int64, one per row of out");
  const int64_t* idx = rows.data_ptr<int64_t>();
  const int64_t N = qs.size(0);
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < N, "quant_dequantize: row ", idx[i], " is outside [0, ", N, ")");
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows.size(0), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = idx[i];
      float* dst = o + i * K;
#if defined(KVD_QUANT_VEC)
      for (int64_t b = 0; b < w.nb; ++b) {
        const __m256i q = load_block(w, w.qs + n * w.row_bytes + b * quant_bytes(kind));
        const float dw = h2f(w.d[n * w.nb + b]);
        const __m256 dv = _mm256_set1_ps(dw), mv = _mm256_set1_ps(block_min(w, n, b, dw));
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + b * kBlock + 8 * j, widen8(w, q, j, dv, mv));
      }
#else
      for (int64_t k = 0; k < K; ++k) dst[k] = weight_at(w, n, k);
#endif
    }
  });
}
