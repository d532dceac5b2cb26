// Sampled rows' kept set and draw, on the CPU (kvd/worker/sampler.py).
//
//   sample_rows(x, temperature, kth, min_p, top_p, uniform, tokens, threshold)
//
// x (n, V) float32: each row's transformed logits, turned in place into
// u = exp((x - max) / temperature), so that its largest entry is 1 and masked tokens 0 (as
// is any token e^87 times less likely than the top one). `kth` is the index of the row's
// k-th largest logit under top-k (-1: none). Per row: the floor u >= max(min_p, u[kth]) is
// min-p and top-k (ties kept); where top_p < 1, keep the largest tokens at or above the floor while
// the mass before them is below top_p of the floor's mass. The row keeps u >= `threshold`.
// Where uniform >= 0 the row also draws a token from its kept set in proportion to u:
// uniform in [0, 1) scaled to the kept mass, then a running sum.
//
// Without a sort over the vocabulary. No token under c = (1 - top_p) * mass / V can be
// kept (all of them together weigh less than V * c). One pass over V lists the tokens at or
// above c; their histogram (mass per bucket of the float's exponent and top 6 mantissa
// bits: 1.6% wide, ordered as u is) is walked from the top bucket to the one where top_p's
// mass is reached; that bucket's tokens (and those above it, where they are few) are
// gathered and only that bucket's are sorted; the draw runs among them. Every step after
// the first pass runs over the list, whatever the row's distribution. torch's way (a top-k,
// and a sort where the kept set is large: kvd/worker/kept_set.py) is the reference. Rows
// run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kvd_vec.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int kShift = 17;                             // keep the exponent and 6 mantissa bits
constexpr int kBuckets = (0x3F800000 >> kShift) + 1;  // u in [0, 1]
constexpr int64_t kGatherAll = 4096;                   // tokens from the boundary bucket up gathered whole

inline int bucket(float u) {
  int32_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  return std::min(bits >> kShift, kBuckets - 1);
}

inline float bucket_start(int b) {  // the smallest float of bucket b
  const int32_t bits = b << kShift;
  float u;
  std::memcpy(&u, &bits, sizeof u);
  return u;
}

// x becomes u = e^((x - max) / T) in place, 0 below e^-87; returns the row's sum of u. Every
// entry takes the same steps (the tail too, as a masked vector), so equal logits give equal u.
// The sum is float64 over float32 partial sums of 256 entries: top-p's boundary in a flat
// row of tens of thousands of kept tokens is finer than a float32 sum of the row.
double exponentiate(float* x, int64_t V, float inv_t) {
  float top = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
#if defined(KVD_VEC)
  using kvd::Vec;
  constexpr int64_t W = Vec::kLanes;
  const Vec::V lowest = Vec::set1(-std::numeric_limits<float>::infinity());
  Vec::V m = lowest;
  int64_t i = 0;
  for (; i + W <= V; i += W) m = Vec::max(m, Vec::load(x + i));
  m = Vec::max(m, Vec::load_first(x + i, V - i, lowest));
  top = Vec::max_of(m);
  if (top == -std::numeric_limits<float>::infinity()) top = 0.f;  // a row of -inf: all 0
  const Vec::V vt = Vec::set1(top), vinv = Vec::set1(inv_t), cutoff = Vec::set1(-kvd::kExpLowest), zero = Vec::zero();
  constexpr int64_t kBlock = 256;
  for (i = 0; i + W <= V;) {
    Vec::V acc = zero;
    for (const int64_t end = std::min(V - W + 1, i + kBlock); i < end; i += W) {
      const Vec::V t = Vec::mul(Vec::sub(Vec::load(x + i), vt), vinv);
      const Vec::V e = Vec::if_nonneg(Vec::add(t, cutoff), kvd::exp_neg(t), zero);
      Vec::store(x + i, e);
      acc = Vec::add(acc, e);
    }
    sum += Vec::sum(acc);
  }
  if (i < V) {
    const Vec::V t = Vec::mul(Vec::sub(Vec::load_first(x + i, V - i, vt), vt), vinv);
    const Vec::V e = Vec::if_nonneg(Vec::add(t, cutoff), kvd::exp_neg(t), zero);
    Vec::store_first(x + i, V - i, e);
    sum += Vec::sum(Vec::keep_first(e, V - i));
  }
#else
  for (int64_t i = 0; i < V; ++i) top = std::max(top, x[i]);
  if (top == -std::numeric_limits<float>::infinity()) top = 0.f;
  for (int64_t i = 0; i < V; ++i) {
    const float t = (x[i] - top) * inv_t;
    sum += x[i] = t >= kvd::kExpLowest ? kvd::exp_neg(t) : 0.f;
  }
#endif
  return sum;
}

struct Row {
  const float* u = nullptr;
  int64_t V = 0;
  std::vector<double> mass = std::vector<double>(kBuckets);
  std::vector<int32_t> count = std::vector<int32_t>(kBuckets);
  struct Token {
    float u;
    int32_t id;
  };
  std::vector<Token> gathered;  // written without a branch: only the first m count
  std::vector<int32_t> listed;   // the same


  // The mass of u >= lo, in eight running sums (one would be a chain of dependent adds).
  double mass_from(float lo) const {
    double s[8] = {};
    int64_t i = 0;
    for (; i + 8 <= V; i += 8)
      for (int j = 0; j < 8; ++j) s[j] += u[i + j] >= lo ? u[i + j] : 0.f;
    for (; i < V; ++i) s[0] += u[i] >= lo ? u[i] : 0.f;
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }

  // Token i with u >= lo where the running sum passes uniform * kept (the last such token
  // where rounding leaves the sum short).
  // (Where a row keeps some tokens and not others at random, a branch on "kept" is
  // mispredicted half the time: these loops select instead.)
  int64_t draw(float lo, double kept, double uniform) const {
    const double target = uniform * kept;
    double run = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < V; ++i) {
      const bool in = u[i] >= lo;
      run += in ? u[i] : 0.f;
      last = in ? i : last;
      if (run > target) return i;  // (run grew at i: i is kept)
    }
    return last;
  }

  // top-p over u >= floor (of mass `total`); returns the threshold, and draws into `token`.
  float top_p(float floor, double total, double p, double uniform, int64_t& token) {
    const double target = p * total;
    const float c = std::max(floor, static_cast<float>((1.0 - p) * total / static_cast<double>(V) * (1.0 - 1e-6)));
    // The tokens at or above c, listed without a branch (in a flat row half of them are, at
    // random: a branch would be mispredicted half the time), then their histogram.
    listed.resize(V);
    int64_t n = 0;
    for (int64_t i = 0; i < V; ++i) {
      listed[n] = static_cast<int32_t>(i);
      n += u[i] >= c;
    }
    const int low = bucket(c);
    std::fill(mass.begin() + low, mass.end(), 0.0);
    std::fill(count.begin() + low, count.end(), 0);
    for (int64_t j = 0; j < n; ++j) {
      const float v = u[listed[j]];
      const int b = bucket(v);
      mass[b] += v;
      ++count[b];
    }
    double before = 0.0;  // the mass of the buckets above b
    int64_t n_above = 0;
    int b = kBuckets - 1;
    while (b > low && before + mass[b] < target) {
      n_above += count[b];
      before += mass[b--];
    }
    // Every token of the buckets above b is kept; b's are kept largest first while the mass
    // before them is below the target (ties with the last one kept stay). Where few tokens
    // lie from b up (the usual row) they are all gathered and the draw runs among them;
    // else (a flat row) only b's are, and the draw runs over the listed tokens.
    const bool all = n_above + count[b] <= kGatherAll;
    const float start = std::max(bucket_start(b), c), above = bucket_start(b + 1);
    gathered.resize(n);
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t i = listed[j];
      gathered[m] = {u[i], i};
      m += u[i] >= start && (all || u[i] < above);
    }
    const auto first = gathered.begin(), last = gathered.begin() + m;
    const auto mid = all ? std::partition(first, last, [&](const Token& t) { return t.u >= above; }) : first;
    std::sort(mid, last, [](const Token& a, const Token& c) { return a.u > c.u; });
    float threshold = above;  // (where nothing of b is kept, by rounding: the buckets above)
    auto end = mid;
    for (; end != last; ++end) {
      if (before >= target && end->u < threshold) break;
      threshold = end->u;
      before += end->u;
    }
    if (uniform >= 0.0) {
      const double at = uniform * before;
      double run = 0.0;
      if (all) {  // among the gathered tokens
        token = end != first ? std::prev(end)->id : 0;
        for (auto it = first; it != end; ++it) {
          run += it->u;
          if (run > at) {
            token = it->id;
            break;
          }
        }
      } else {  // among the listed ones
        token = 0;
        for (int64_t j = 0; j < n; ++j) {
          const float v = u[listed[j]];
          const bool in = v >= threshold;
          run += in ? v : 0.f;
          token = in ? listed[j] : token;
          if (run > at) break;
        }
      }
    }
    return before > 0.0 ? threshold : floor;  // nothing kept: a row of zeros
  }
};

}  // namespace

void sample_rows(torch::Tensor x, torch::Tensor temperature, torch::Tensor kth, torch::Tensor min_p,
                 torch::Tensor top_p, torch::Tensor uniform, torch::Tensor tokens, torch::Tensor threshold) {
  TORCH_CHECK(x.device().is_cpu() && x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "sample_rows: x must be a contiguous (n, V) float32 CPU tensor");
  const int64_t n = x.size(0), V = x.size(1);
  for (const auto& t : {temperature, min_p, threshold})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.numel() == n,
                "sample_rows: temperature, min_p and threshold: (n,) float32");
  TORCH_CHECK(kth.dtype() == torch::kInt64 && kth.numel() == n, "sample_rows: kth: (n,) int64");
  for (const auto& t : {top_p, uniform})
    TORCH_CHECK(t.dtype() == torch::kFloat64 && t.numel() == n, "sample_rows: top_p and uniform: (n,) float64");
  TORCH_CHECK(tokens.dtype() == torch::kInt64 && tokens.numel() == n, "sample_rows: tokens: (n,) int64");
  float* xp = x.data_ptr<float>();
  const float* temp = temperature.data_ptr<float>();
  const int64_t* kp = kth.data_ptr<int64_t>();
  const float* mp = min_p.data_ptr<float>();
  const double* pp = top_p.data_ptr<double>();
  const double* rp = uniform.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* hp = threshold.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    Row row;
    row.V = V;
    for (int64_t r = begin; r < end; ++r) {
      float* u = xp + r * V;
      double total = exponentiate(u, V, 1.f / temp[r]);
      row.u = u;
      float floor = mp[r];
      if (kp[r] >= 0 && kp[r] < V) floor = std::max(floor, u[kp[r]]);
      const float lo = std::max(floor, std::numeric_limits<float>::min());  // not the masked (0) tokens
      if (floor > 0.f) total = row.mass_from(lo);
      if (pp[r] < 1.0) {
        hp[r] = row.top_p(lo, total, pp[r], rp[r], tp[r]);
      } else {
        hp[r] = lo;
        if (rp[r] >= 0.0) tp[r] = row.draw(lo, total, rp[r]);
      }
    }
  });
}
