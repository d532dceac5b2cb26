// prefill_attention: a prefill chunk's causal attention over its paged KV, on the CPU.
//
// The chunk's T query tokens sit at positions num_computed ... num_computed + T - 1 of
// their request; query i attends to keys 0 ... num_computed + i, all read from the paged
// cache (the chunk's own K and V were written there before the call), so a first chunk
// and a later one are the same computation.
//
//   out, q      (T, H, D)                 q's dtype; (H, D) contiguous per token, any token stride
//   cache       (2, num_blocks, block_size, KVH, D)
//   block_table (blocks,) int64, covering num_computed + T tokens
//
// Per kv head, K is packed once into chunks of one vector of keys (16 on AVX-512, 8 on
// AVX2) laid out for a broadcast multiply (K transposed within the chunk: d-major, a
// vector of keys per d; bfloat16 as pairs of d for vdpbf16ps where the CPU has
// AVX512-BF16) and V into float32 rows.
// Then tiles of query rows (the G query heads of a kv head, token by token) run as
// small register-blocked GEMMs: scores for kMR rows times two chunks of keys, an exact
// two-pass softmax in float32 over each row's own causal length, and P times V with the
// accumulators in registers. float32 throughout, bfloat16 rounded once at the output.
// torch's CPU flash attention took 5.3 ms (float32) and 6.0 ms (bfloat16) per layer
// for a 512-token SmolLM2 prompt here; see docs/benchmarks.md for this kernel's figures.
//
// Head sizes 64 and 128 on AVX-512 and AVX2 (with FMA) builds; elsewhere
// `prefill_attention_supported` says no and kvd's attention keeps torch's SDPA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kvd_vec.h"

#if defined(KVD_VEC)
namespace {

using kvd::Rows;
using kvd::softmax_row;

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

using kvd::Vec;
constexpr int64_t kLanes = Vec::kLanes;  // keys per packed chunk: one vector

constexpr int kMR = 6;  // query rows per tile (scores: 6 x 2 accumulators)

// The packed K of one kv head: chunk c, step j holds kLanes keys' values at d = j (float32)
// or the pair d = 2j, 2j + 1 (bfloat16 pairs, one 32-bit lane per key).
template <typename P>
struct PackedK {
  std::vector<P> data;
  int64_t steps;  // D (float32) or D / 2 (pairs)
  const P* chunk(int64_t c) const { return data.data() + c * steps * kLanes; }
};

// One V row widened to float32.
template <typename T, int ND>
inline void widen_row(float* dst, const T* src) {
  for (int i = 0; i < ND; ++i) Vec::store(dst + kLanes * i, Vec::load(src + kLanes * i));
}

template <typename T, typename P, int ND>
void pack_head(Rows<T> k, Rows<T> v, int64_t C, PackedK<P>& kt, float* vf) {
  constexpr int64_t D = ND * kLanes;
  const int64_t chunks = (C + kLanes - 1) / kLanes;
  kt.data.assign(chunks * kt.steps * kLanes, P{});  // keys past C stay zero: scored, never used
  for (int64_t t = 0; t < C; ++t) {
    const T* kr = k.next();
    const T* vr = v.next();
    P* dst = kt.data.data() + (t / kLanes) * kt.steps * kLanes + t % kLanes;
    if constexpr (std::is_same_v<P, uint32_t>) {  // bf16 pairs
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(kr);
      for (int64_t j = 0; j < D / 2; ++j)
        dst[j * kLanes] = bits[2 * j] | (static_cast<uint32_t>(bits[2 * j + 1]) << 16);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * kLanes] = kvd::widen(kr[d]);
    }
    widen_row<T, ND>(vf + t * D, vr);
  }
}

#if defined(__AVX512F__)
// s[r * ld + c * 16 ...] = scale * q_r . k for `chunks` chunks from c0, kNC at a time.
template <typename P, int ND, int kNC>
inline void score_chunks(const P* const* q, const PackedK<P>& kt, int64_t c0, float scale, float* s, int64_t ld) {
  __m512 acc[kMR][kNC];
  for (int r = 0; r < kMR; ++r)
    for (int n = 0; n < kNC; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t j = 0; j < kt.steps; ++j) {
    if constexpr (std::is_same_v<P, uint32_t>) {
#if defined(__AVX512BF16__)
      __m512bh kv[kNC];
      for (int n = 0; n < kNC; ++n) kv[n] = (__m512bh)_mm512_loadu_si512(kt.chunk(c0 + n) + j * 16);
      for (int r = 0; r < kMR; ++r) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][j]));
        for (int n = 0; n < kNC; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], qb, kv[n]);
      }
#endif
    } else {
      __m512 kv[kNC];
      for (int n = 0; n < kNC; ++n) kv[n] = _mm512_loadu_ps(kt.chunk(c0 + n) + j * 16);
      for (int r = 0; r < kMR; ++r) {
        const __m512 qb = _mm512_set1_ps(q[r][j]);
        for (int n = 0; n < kNC; ++n) acc[r][n] = _mm512_fmadd_ps(qb, kv[n], acc[r][n]);
      }
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < kMR; ++r)
    for (int n = 0; n < kNC; ++n) _mm512_storeu_ps(s + r * ld + (c0 + n) * 16, _mm512_mul_ps(acc[r][n], sc));
}

// out_r = sum_t p[r * ld + t] * v_t / denom_r for kR rows, t < len (p zero past each row's own).
template <typename T, int ND, int kR>
inline void weigh_values(const float* p, int64_t ld, const float* denom, const float* vf, int64_t len,
                         T* const* out) {
  constexpr int64_t D = ND * 16;
  __m512 acc[kR][ND];
  for (int r = 0; r < kR; ++r)
    for (int i = 0; i < ND; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    __m512 x[ND];
    for (int i = 0; i < ND; ++i) x[i] = _mm512_loadu_ps(vf + t * D + 16 * i);
    kvd::weigh_row<ND, kR>(acc, x, p + t, ld);
  }
  kvd::store_rows<T, ND, kR>(acc, denom, out);
}

// Query rows per P.V pass: the accumulators and one V row in 32 zmm.
template <int ND>
constexpr int kPV = ND <= 4 ? kMR : kMR / 2;

#else  // AVX2: the same steps at eight lanes, in sixteen registers
// s[r * ld + c * 8 ...] = scale * q_r . k for kNC chunks from c0 (float32 keys only: AVX2
// has no bf16 dot, so bfloat16 keys are packed widened).
template <typename P, int ND, int kNC>
inline void score_chunks(const P* const* q, const PackedK<P>& kt, int64_t c0, float scale, float* s, int64_t ld) {
  static_assert(std::is_same_v<P, float>, "AVX2 packs K as float32");
  __m256 acc[kMR][kNC];
  for (int r = 0; r < kMR; ++r)
    for (int n = 0; n < kNC; ++n) acc[r][n] = _mm256_setzero_ps();
  for (int64_t j = 0; j < kt.steps; ++j) {
    __m256 kv[kNC];
    for (int n = 0; n < kNC; ++n) kv[n] = _mm256_loadu_ps(kt.chunk(c0 + n) + j * 8);
    for (int r = 0; r < kMR; ++r) {
      const __m256 qb = _mm256_broadcast_ss(q[r] + j);
      for (int n = 0; n < kNC; ++n) acc[r][n] = _mm256_fmadd_ps(qb, kv[n], acc[r][n]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < kMR; ++r)
    for (int n = 0; n < kNC; ++n) _mm256_storeu_ps(s + r * ld + (c0 + n) * 8, _mm256_mul_ps(acc[r][n], sc));
}

// out_r = sum_t p[r * ld + t] * v_t / denom_r for kR rows, t < len, in column passes of two
// vectors (kR x 2 accumulators, two of V and a weight: 15 of 16 registers at kR = 6).
template <typename T, int ND, int kR>
inline void weigh_values(const float* p, int64_t ld, const float* denom, const float* vf, int64_t len,
                         T* const* out) {
  constexpr int NC = 2;
  constexpr int64_t D = ND * 8;
  for (int c = 0; c < ND; c += NC) {
    __m256 acc[kR][NC];
    for (int r = 0; r < kR; ++r)
      for (int i = 0; i < NC; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) kvd::avx2::weigh_cols<NC, kR>(acc, vf + t * D + c * 8, p + t, ld);
    T* o[kR];
    for (int r = 0; r < kR; ++r) o[r] = out[r] + c * 8;
    kvd::avx2::store_cols<T, NC, kR>(acc, denom, o);
  }
}

template <int ND>
constexpr int kPV = kMR;
#endif

template <typename T, typename P, int ND>
void run(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table, int64_t nc,
         double scale) {
  constexpr int64_t D = ND * kLanes;
  const int64_t T_ = q.size(0), H = q.size(1);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3), G = H / KVH;
  const int64_t C = nc + T_, chunks = (C + kLanes - 1) / kLanes, ld = chunks * kLanes;
  const int64_t tok_stride = KVH * D, block_elems = BS * tok_stride;
  const T* kp = cache.data_ptr<T>();
  const T* vp = kp + NB * block_elems;
  const int64_t* table = block_table.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs = q.stride(0), os = out.stride(0);  // tokens may be rows of a wider tensor (q of a fused qkv)
  const float fscale = static_cast<float>(scale);

  // 1. Pack each kv head's K (transposed per chunk) and V (float32 rows).
  std::vector<PackedK<P>> kt(KVH);
  std::vector<float> vf(KVH * C * D);
  at::parallel_for(0, KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      kt[h].steps = std::is_same_v<P, uint32_t> ? D / 2 : D;
      pack_head<T, P, ND>(Rows<T>{kp + h * D, table, BS, block_elems, tok_stride},
                          Rows<T>{vp + h * D, table, BS, block_elems, tok_stride}, C, kt[h], vf.data() + h * C * D);
    }
  });

  // 2. Tiles of kMR query rows of one kv head; row r of head h is token r / G, query head h G + r % G.
  // Later tiles see more keys: tiles are dealt to threads in turn, not in contiguous ranges.
  const int64_t rows = T_ * G, tiles = (rows + kMR - 1) / kMR, tasks = tiles * KVH;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    std::vector<float> s(kMR * ld);
    std::vector<P> qbuf(kMR * D);  // the tile's query rows as the score kernel reads them
    for (int64_t w = wb; w < we; ++w)
      for (int64_t task = w; task < tasks; task += workers) {
        const int64_t h = task % KVH, r0 = (task / KVH) * kMR, m = std::min<int64_t>(kMR, rows - r0);
        const P* qrow[kMR];
        T* orow[kMR];
        int64_t lim[kMR];
        for (int r = 0; r < kMR; ++r) {
          const int64_t row = r0 + std::min<int64_t>(r, m - 1);  // rows past m repeat the last: never stored
          const int64_t tok = row / G, head = h * G + row % G;
          const T* src = qp + tok * qs + head * D;
          P* dst = qbuf.data() + r * D;
          if constexpr (std::is_same_v<P, uint32_t>)
            std::memcpy(dst, src, D * sizeof(T));  // already pairs of bf16
          else
            for (int64_t d = 0; d < D; ++d) dst[d] = kvd::widen(src[d]);
          qrow[r] = dst;
          orow[r] = op + tok * os + head * D;
          lim[r] = nc + tok + 1;
        }
        const int64_t len = lim[kMR - 1], nchunks = (len + kLanes - 1) / kLanes;
        int64_t c = 0;
        for (; c + 2 <= nchunks; c += 2) score_chunks<P, ND, 2>(qrow, kt[h], c, fscale, s.data(), ld);
        if (c < nchunks) score_chunks<P, ND, 1>(qrow, kt[h], c, fscale, s.data(), ld);
        float denom[kMR];
        for (int r = 0; r < kMR; ++r) {
          denom[r] = softmax_row(s.data() + r * ld, lim[r]);
          std::fill(s.data() + r * ld + lim[r], s.data() + r * ld + len, 0.f);
        }
        T* tmp_out[kMR];
        alignas(64) T scratch[kMR][D];
        for (int r = 0; r < kMR; ++r) tmp_out[r] = r < m ? orow[r] : scratch[r];
        for (int r = 0; r < kMR; r += kPV<ND>)
          weigh_values<T, ND, kPV<ND>>(s.data() + r * ld, ld, denom + r, vf.data() + h * C * D, len, tmp_out + r);
      }
  });
}

}  // namespace
#endif

bool prefill_attention_supported(int64_t head_dim) {
#if defined(KVD_VEC)
  return head_dim == 64 || head_dim == 128;
#else
  (void)head_dim;
  return false;
#endif
}

void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
                       int64_t num_computed, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "prefill_attention: q and out must be (T, H, D) of one shape");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, "prefill_attention: cache must be (2, num_blocks, block_size, KVH, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && cache.scalar_type() == dt && out.scalar_type() == dt,
              "prefill_attention: q, cache and out must all be float32 or all bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.stride(2) == 1 && out.stride(1) == out.size(2),
              "prefill_attention: q and out must have contiguous (H, D) rows (any token stride)");
  TORCH_CHECK(cache.is_contiguous() && block_table.is_contiguous(), "prefill_attention: contiguous cache and table");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 1, "prefill_attention: int64 (blocks,) table");
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "prefill_attention: head sizes disagree");
  TORCH_CHECK(prefill_attention_supported(D), "prefill_attention: head_dim ", D, " is not supported by this build");
  TORCH_CHECK(num_computed >= 0 && T_ >= 1, "prefill_attention: empty chunk or negative num_computed");
  const int64_t need = (num_computed + T_ + BS - 1) / BS;
  TORCH_CHECK(block_table.size(0) >= need, "prefill_attention: ", block_table.size(0), " blocks cover fewer than ",
              num_computed + T_, " tokens");
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < need; ++i) TORCH_CHECK(table[i] >= 0 && table[i] < NB, "prefill_attention: block id out of range");
#if defined(KVD_VEC)
  constexpr int n64 = 64 / kLanes, n128 = 128 / kLanes;  // vectors per head
  if (dt == at::kFloat) {
    if (D == 64) run<float, float, n64>(out, q, cache, block_table, num_computed, scale);
    else run<float, float, n128>(out, q, cache, block_table, num_computed, scale);
  } else {
    using P = std::conditional_t<kBf16Dot, uint32_t, float>;  // bf16 pairs for vdpbf16ps, else widened
    if (D == 64) run<c10::BFloat16, P, n64>(out, q, cache, block_table, num_computed, scale);
    else run<c10::BFloat16, P, n128>(out, q, cache, block_table, num_computed, scale);
  }
#endif
}
