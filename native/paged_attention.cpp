// paged_decode_attention: one query token per sequence against its KV blocks, on the CPU.
//
// The decode step's attention reads each sequence's K/V straight from the paged cache:
// no gather into a padded copy first (which costs a write and a second read of every
// byte). Parallel over (sequence, kv head); each task scores its G = H / KVH query heads
// against the sequence's tokens, softmaxes in float32 and accumulates V.
//
//   out   (B, H, D)                         float32, written
//   q     (B, H, D)                         float32
//   cache (2, num_blocks, block_size, KVH, D) float32, K then V, contiguous
//   block_table (B, max_blocks) int64; lens (B,) int64 (tokens of context, query included)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// 16 independent lanes: the compiler vectorizes this without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache,
                            torch::Tensor block_table, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be (B, H, D) of one shape");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, "cache must be (2, num_blocks, block_size, KVH, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && cache.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && cache.is_contiguous() && block_table.is_contiguous() &&
                  lens.is_contiguous(), "contiguous tensors only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = cache.size(1), BS = cache.size(2), KVH = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && H % KVH == 0, "head sizes disagree");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && lens.size(0) == B, "one table row per sequence");
  const int64_t MB = block_table.size(1), G = H / KVH;
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= MB * BS, "lens[", b, "] = ", len[b], " outside [1, ", MB * BS, "]");
    for (int64_t i = 0; i < (len[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(table[b * MB + i] >= 0 && table[b * MB + i] < NB, "block id out of range");
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = cache.data_ptr<float>();
  const float* vp = kp + NB * BS * KVH * D;
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t tok_stride = KVH * D;

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kh = task % KVH, L = len[b];
      scores.resize(G * L);
      const float* qb = qp + (b * H + kh * G) * D;  // the G query heads of this kv head
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += BS, ++blk) {
        const int64_t n = std::min(BS, L - t0);
        const float* k = kp + table[b * MB + blk] * BS * tok_stride + kh * D;
        for (int64_t o = 0; o < n; ++o)
          for (int64_t g = 0; g < G; ++g) scores[g * L + t0 + o] = dot(qb + g * D, k + o * tok_stride, D) * fscale;
      }
      std::vector<float> denom(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        denom[g] = sum;
        std::fill(op + (b * H + kh * G + g) * D, op + (b * H + kh * G + g + 1) * D, 0.f);
      }
      for (int64_t t0 = 0, blk = 0; t0 < L; t0 += BS, ++blk) {
        const int64_t n = std::min(BS, L - t0);
        const float* v = vp + table[b * MB + blk] * BS * tok_stride + kh * D;
        for (int64_t o = 0; o < n; ++o)
          for (int64_t g = 0; g < G; ++g) axpy(op + (b * H + kh * G + g) * D, scores[g * L + t0 + o], v + o * tok_stride, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + kh * G + g) * D;
        const float inv = 1.f / denom[g];
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over paged KV (CPU, float32)");
}
