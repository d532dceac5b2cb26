// Weight-only quantized linear layers on the CPU: out (M, N) = x (M, K) . W^T, with W held
// as GGUF-style blocks of 32 weights along K, never as float32.
//
//   kind 0  Q8_0  w = d * q          q int8,  d f16   (34 bytes per block)
//   kind 1  Q4_0  w = d * (q - 8)    q 0..15, d f16   (18 bytes)
//   kind 2  Q4_1  w = d * q + m      q 0..15, d, m f16 (20 bytes)
//
// Storage: the tiled layout of kvd_quant.h, columns interleaved 16 at a time: qs (N, K/32 *
// 16 or 32) uint8, d and m (N, K/32) float16, each holding exactly GGUF's bytes, reordered.
//
//   quant_linear(out, x, qs, d, m, kind, int_dot, isa)
//       int_dot: x is quantized per block of 32 to int8 (scale max|x| / 127, as llama.cpp's
//       Q8_0 activations) and each block's dot is integer (VNNI vpdpbusd where the path has
//       it, maddubs + madd elsewhere), scaled once per block. Otherwise every weight is
//       widened to float in registers and multiplied by x in float (no activation rounding).
//       isa: -1 the best path this build has, else one of quant_isas() (tests run each).
//   quant_dequantize(out, qs, d, m, kind, rows)
//       out[i] = the float32 weights of column rows[i] (the embedding lookup, and the
//       prefill path's tiles for a float GEMM).
//   quant_isas()
//       the paths built: 0 scalar, 1 AVX2, 2 AVX2 + VNNI, 3 AVX-512, 4 AVX-512 + VNNI.
//
// Decode reads each weight byte once per call: a tile's blocks (a few KiB) stay in L1 while
// every group of activation rows passes over them. Tiles run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvd_quant.h"

namespace {

using namespace kvd::quant;

enum Isa : int64_t { kBest = -1, kScalar = 0, kAvx2 = 1, kAvx2Vnni = 2, kAvx512 = 3, kAvx512Vnni = 4 };

std::vector<int64_t> built_isas() {
  std::vector<int64_t> isas{kScalar};
#if defined(KVD_Q_AVX2)
  isas.push_back(kAvx2);
#endif
#if defined(KVD_Q_AVX2_VNNI)
  isas.push_back(kAvx2Vnni);
#endif
#if defined(KVD_Q_AVX512)
  isas.push_back(kAvx512);
#endif
#if defined(KVD_Q_AVX512_VNNI)
  isas.push_back(kAvx512Vnni);
#endif
  return isas;
}

// The weights' view the kernels take: raw pointers and sizes of one tiled matrix.
struct QWeights {
  const uint8_t* qs;
  const at::Half* d;
  const at::Half* m;  // Q4_1 only
  int64_t kind, N, nb, qb;  // columns, blocks per column, quant bytes per block

  int64_t tiles() const { return (N + kTile - 1) / kTile; }
  int width(int64_t t) const { return static_cast<int>(std::min<int64_t>(kTile, N - t * kTile)); }
  // Column n's block b: its first group's four bytes; group g is 4 width(tile) bytes on.
  const uint8_t* block(int64_t n, int64_t b) const {
    const int64_t t = n / kTile, wd = width(t);
    return qs + t * kTile * nb * qb + b * wd * qb + (n % kTile) * 4;
  }
  int64_t group_stride(int64_t n) const { return 4 * width(n / kTile); }
  // Byte i (GGUF's order) of column n's block b, and the offset of its scales.
  uint8_t byte(int64_t n, int64_t b, int64_t i) const { return block(n, b)[(i / 4) * group_stride(n) + i % 4]; }
  int64_t scale_at(int64_t n, int64_t b) const {
    const int64_t t = n / kTile;
    return t * kTile * nb + b * width(t) + n % kTile;
  }
  Tile tile(int64_t t) const {
    return {qs + t * kTile * nb * qb, d + t * kTile * nb, m ? m + t * kTile * nb : nullptr};
  }
  // The quant d q + m of a weight is q * d plus this (per unit of an activation sum)
  float min_term(int64_t n, int64_t b) const {
    if (kind == kQ4_1) return static_cast<float>(m[scale_at(n, b)]);
    return kind == kQ4_0 ? -8.f * static_cast<float>(d[scale_at(n, b)]) : 0.f;
  }
  int quant(int64_t n, int64_t b, int64_t k) const {  // weight k (0..31) of a block, as stored
    if (kind == kQ8_0) return static_cast<int8_t>(byte(n, b, k));
    return k < 16 ? byte(n, b, k) & 0x0F : byte(n, b, k - 16) >> 4;
  }
};

// The short last tile copied into a full one, zero columns after its width: the kernels
// then read every tile alike.
struct PaddedTile {
  std::vector<uint8_t> q;
  std::vector<at::Half> d, m;

  PaddedTile(const QWeights& w) {
    const int64_t t = w.tiles() - 1;
    const int wd = w.width(t);
    if (wd == kTile) return;
    const Tile src = w.tile(t);
    q.assign(w.nb * kTile * w.qb, 0);
    d.assign(w.nb * kTile, at::Half(0.f));
    m.assign(w.m ? w.nb * kTile : 0, at::Half(0.f));
    for (int64_t b = 0; b < w.nb; ++b) {
      for (int64_t g = 0; g < w.qb / 4; ++g)
        std::memcpy(q.data() + b * kTile * w.qb + g * kTile * 4, src.q + b * wd * w.qb + g * wd * 4, wd * 4);
      std::copy_n(src.d + b * wd, wd, d.data() + b * kTile);
      if (w.m) std::copy_n(src.m + b * wd, wd, m.data() + b * kTile);
    }
  }
  bool empty() const { return q.empty(); }
  Tile tile() const { return {q.data(), d.data(), m.empty() ? nullptr : m.data()}; }
};

// Activations quantized per block (Acts' buffers).
struct QActs {
  std::vector<int8_t> q;
  std::vector<float> da, sa;
  Acts view(int64_t K) const { return {q.data(), da.data(), sa.data(), K, K / kBlock}; }
};

template <typename T>
void quantize32_scalar(const T* x, int8_t* q, bool biased, float& da, float& sa) {
  float v[kBlock], amax = 0.f;
  for (int i = 0; i < kBlock; ++i) {
    v[i] = static_cast<float>(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int qi = static_cast<int>(std::nearbyint(v[i] * inv));
    sum += qi;
    q[i] = static_cast<int8_t>(biased ? qi ^ 0x80 : qi);
  }
  da = amax / 127.f;
  sa = da * static_cast<float>(sum);
}

// Rows quantized block by block, by the path's vector code (S) or the scalar one (void).
template <class S, typename T>
void quantize_acts(const T* x, int64_t ldx, int64_t M, int64_t K, bool biased, QActs& a) {
  const int64_t nb = K / kBlock;
  a.q.resize(M * K);
  a.da.resize(M * nb);
  a.sa.resize(M * nb);
  // a few rows take microseconds: parallel only for prefill-sized inputs
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        const T* src = x + r * ldx + b * kBlock;
        int8_t* q = a.q.data() + r * K + b * kBlock;
        if constexpr (std::is_void_v<S>)
          quantize32_scalar(src, q, biased, a.da[r * nb + b], a.sa[r * nb + b]);
        else
          S::quantize32(src, q, biased, a.da[r * nb + b], a.sa[r * nb + b]);
      }
  });
}

template <int N, class Fn>
inline void with_rows(int r, Fn&& fn) {
  if constexpr (N > 0) {
    if (r == N) return fn(std::integral_constant<int, N>{});
    with_rows<N - 1>(r, fn);
  }
}

// Rows of a tile's results (ld S::kCols, float) stored into out as T, `cols` of them a row.
template <class S, typename T>
inline void store_rows(const float* tmp, int rows, int cols, T* out, int64_t ldo) {
  for (int r = 0; r < rows; ++r) {
    if (cols == S::kCols)
      S::store(out + r * ldo, S::load(tmp + r * S::kCols));  // bfloat16: rounded to nearest even
    else
      for (int c = 0; c < cols; ++c) out[r * ldo + c] = static_cast<T>(tmp[r * S::kCols + c]);
  }
}

// Every tile in [t0, t1) against all M rows: per tile and part of it (S::kCols columns), the
// rows in groups of up to S::kRows, each group one pass over the tile's blocks (in L1 after
// the first). float32 results go straight to out; others through a tile of floats in L1.
template <class S, int64_t kKind, typename T>
void tiles_vec(const QWeights& w, const PaddedTile& pad, const Acts& a, const float* xf, int64_t M, bool int_dot,
               int64_t t0, int64_t t1, T* out) {
  const int64_t K = w.nb * kBlock;
  float tmp[S::kRows * S::kCols];
  for (int64_t t = t0; t < t1; ++t) {
    const int wd = w.width(t);
    const Tile tile = wd == kTile ? w.tile(t) : pad.tile();
    const Tile next = t + 1 < t1 && w.width(t + 1) == kTile ? w.tile(t + 1) : tile;
    // the next tile is asked for block by block as this one is computed: the hardware
    // prefetcher alone left a decode step's matrices, streamed from memory, at half speed at
    // 16-32 rows and at two thirds at one row (docs/benchmarks.md)
    for (int part = 0; part * S::kCols < wd; ++part) {
      const int cols = std::min(S::kCols, wd - part * S::kCols);
      for (int64_t r0 = 0; r0 < M; r0 += S::kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(S::kRows, M - r0));
        T* at = out + r0 * w.N + t * kTile + part * S::kCols;
        float* dst = tmp;
        int64_t ldo = S::kCols;
        if constexpr (std::is_same_v<T, float>) {
          if (cols == S::kCols) dst = at, ldo = w.N;
        }
        with_rows<S::kRows>(rows, [&](auto r) {
          constexpr int R = decltype(r)::value;
          if (int_dot)
            tile_int<S, kKind, R>(tile, part, a, r0, dst, ldo, part == 0 && r0 == 0 ? &next : nullptr);
          else
            tile_float<S, kKind, R>(tile, part, xf, K, w.nb, r0, dst, ldo);
        });
        if (dst == tmp) store_rows<S>(tmp, rows, cols, at, w.N);
      }
    }
  }
}

// The scalar code: the same sums, one weight at a time (builds without AVX2, FMA and F16C).
template <typename T>
void tiles_scalar(const QWeights& w, const Acts& a, const float* xf, int64_t M, bool int_dot, int64_t t0,
                  int64_t t1, T* out) {
  const int64_t K = w.nb * kBlock;
  for (int64_t n = t0 * kTile; n < std::min(w.N, t1 * kTile); ++n)
    for (int64_t r = 0; r < M; ++r) {
      float s = 0.f;
      for (int64_t b = 0; b < w.nb; ++b) {
        const float dw = static_cast<float>(w.d[w.scale_at(n, b)]), mn = w.min_term(n, b);
        if (int_dot) {
          const int8_t* q = a.q + r * K + b * kBlock;
          int dot = 0;
          for (int k = 0; k < kBlock; ++k) dot += w.quant(n, b, k) * q[k];
          s += dw * a.da[r * w.nb + b] * static_cast<float>(dot) + mn * a.sa[r * w.nb + b];
        } else {
          for (int k = 0; k < kBlock; ++k)
            s += (dw * static_cast<float>(w.quant(n, b, k)) + mn) * xf[r * K + b * kBlock + k];
        }
      }
      out[r * w.N + n] = static_cast<T>(s);
    }
}

template <class S>
constexpr bool biased_acts(int64_t kind) {
  if constexpr (std::is_void_v<S>)
    return false;
  else
    return kind == kQ8_0 && S::kHasVnni;
}

// The whole call on one path (S void: the scalar code), x and out of dtype T.
template <class S, typename T>
void run_typed(const QWeights& w, const torch::Tensor& x, bool int_dot, T* out) {
  const int64_t M = x.size(0), K = x.size(1);
  QActs qa;
  torch::Tensor xf;
  if (int_dot)
    quantize_acts<S>(x.data_ptr<T>(), x.stride(0), M, K, biased_acts<S>(w.kind), qa);
  else
    xf = x.to(at::kFloat).contiguous();
  const Acts a = qa.view(K);
  const float* xp = int_dot ? nullptr : xf.data_ptr<float>();
  // Grain: enough tiles that a thread's share is worth waking it for (about 64 KiB of quants
  // at one row; the work grows with the rows)
  const int64_t work = kTile * w.nb * w.qb * (1 + M / 4);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / work);
  if constexpr (std::is_void_v<S>) {
    at::parallel_for(0, w.tiles(), grain,
                     [&](int64_t t0, int64_t t1) { tiles_scalar(w, a, xp, M, int_dot, t0, t1, out); });
  } else {
    const PaddedTile pad(w);
    at::parallel_for(0, w.tiles(), grain, [&](int64_t t0, int64_t t1) {
      switch (w.kind) {
        case kQ8_0: tiles_vec<S, kQ8_0>(w, pad, a, xp, M, int_dot, t0, t1, out); break;
        case kQ4_0: tiles_vec<S, kQ4_0>(w, pad, a, xp, M, int_dot, t0, t1, out); break;
        default: tiles_vec<S, kQ4_1>(w, pad, a, xp, M, int_dot, t0, t1, out); break;
      }
    });
  }
}

template <class S>
void run(const QWeights& w, const torch::Tensor& x, bool int_dot, torch::Tensor& out) {
  if (x.scalar_type() == at::kFloat)
    run_typed<S>(w, x, int_dot, out.data_ptr<float>());
  else
    run_typed<S>(w, x, int_dot, out.data_ptr<c10::BFloat16>());
}

// One column's block as 32 floats d q + mn, its groups of four quant bytes `stride` apart
// (products of a float16 scale and a quant are exact in float32: one rounding, as the
// reference's). The embedding lookup and the prefill path's float tiles.
inline void widen_block(const uint8_t* p, int64_t stride, int64_t kind, float dw, float mn, float* dst) {
  auto word = [&](int g) {
    int32_t v;
    std::memcpy(&v, p + g * stride, 4);
    return v;
  };
#if defined(KVD_Q_AVX2)
  const __m256 d = _mm256_set1_ps(dw), m = _mm256_set1_ps(mn);
  auto put8 = [&](__m256i q, float* to) { _mm256_storeu_ps(to, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m)); };
  if (kind == kQ8_0) {
    for (int h = 0; h < 2; ++h) {  // weights 16 h .. 16 h + 15
      const __m128i q = _mm_setr_epi32(word(4 * h), word(4 * h + 1), word(4 * h + 2), word(4 * h + 3));
      put8(_mm256_cvtepi8_epi32(q), dst + 16 * h);
      put8(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)), dst + 16 * h + 8);
    }
  } else {
    const __m128i q = _mm_setr_epi32(word(0), word(1), word(2), word(3));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    put8(_mm256_cvtepu8_epi32(lo), dst);
    put8(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), dst + 8);
    put8(_mm256_cvtepu8_epi32(hi), dst + 16);
    put8(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), dst + 24);
  }
#else
  uint8_t blk[kBlock];
  for (int g = 0; g < quant_bytes(kind) / 4; ++g) {
    const int32_t v = word(g);
    std::memcpy(blk + 4 * g, &v, 4);
  }
  if (kind == kQ8_0) {
    for (int k = 0; k < kBlock; ++k) dst[k] = dw * static_cast<float>(static_cast<int8_t>(blk[k]));
  } else {
    for (int k = 0; k < 16; ++k) {
      dst[k] = dw * static_cast<float>(blk[k] & 0x0F) + mn;
      dst[k + 16] = dw * static_cast<float>(blk[k] >> 4) + mn;
    }
  }
#endif
}

QWeights check_weights(const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m, int64_t kind,
                       int64_t K, const char* op) {
  TORCH_CHECK(kind == kQ8_0 || kind == kQ4_0 || kind == kQ4_1, op, ": kind must be 0 (Q8_0), 1 (Q4_0) or 2 (Q4_1)");
  TORCH_CHECK(K % kBlock == 0, op, ": in_features ", K, " is not a multiple of 32");
  const int64_t nb = K / kBlock, N = qs.size(0), qb = quant_bytes(kind);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == nb * qb, op,
              ": qs must be contiguous uint8 (N, ", nb * qb, ")");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == N * nb, op,
              ": d must be contiguous float16 (N, K/32)");
  if (kind == kQ4_1)
    TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.numel() == N * nb, op,
                ": m must be contiguous float16 (N, K/32) for Q4_1");
  return {qs.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), kind == kQ4_1 ? m.data_ptr<at::Half>() : nullptr, kind,
          N, nb, qb};
}

}  // namespace

std::vector<int64_t> quant_isas() { return built_isas(); }

void quant_linear(torch::Tensor out, torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m,
                  int64_t kind, bool int_dot, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quant_linear: x must be 2-D with contiguous rows");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "quant_linear: x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  const QWeights w = check_weights(qs, d, m, kind, K, "quant_linear");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == w.N && out.is_contiguous() &&
                  out.scalar_type() == dt,
              "quant_linear: out must be contiguous (M, N) of x's dtype");
  const std::vector<int64_t> isas = built_isas();
  if (isa == kBest) isa = isas.back();
  TORCH_CHECK(std::find(isas.begin(), isas.end(), isa) != isas.end(), "quant_linear: isa ", isa,
              " is not built here (quant_isas())");
  if (M == 0 || w.N == 0) return;
  // bfloat16 results are rounded once, from the float32 sums
  switch (isa) {
#if defined(KVD_Q_AVX512_VNNI)
    case kAvx512Vnni: run<Zmm<true>>(w, x, int_dot, out); break;
#endif
#if defined(KVD_Q_AVX512)
    case kAvx512: run<Zmm<false>>(w, x, int_dot, out); break;
#endif
#if defined(KVD_Q_AVX2_VNNI)
    case kAvx2Vnni: run<Ymm<true>>(w, x, int_dot, out); break;
#endif
#if defined(KVD_Q_AVX2)
    case kAvx2: run<Ymm<false>>(w, x, int_dot, out); break;
#endif
    default: run<void>(w, x, int_dot, out); break;
  }
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
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < w.N, "quant_dequantize: row ", idx[i], " is outside [0, ", w.N, ")");
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows.size(0), 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = idx[i], stride = w.group_stride(n);
      for (int64_t b = 0; b < w.nb; ++b)
        widen_block(w.block(n, b), stride, kind, static_cast<float>(w.d[w.scale_at(n, b)]), w.min_term(n, b),
                    o + i * K + b * kBlock);
    }
  });
}
