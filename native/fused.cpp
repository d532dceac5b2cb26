// Fused row-wise ops of a decoder layer, on the CPU: what transformers spells as five to
// ten small tensor ops (each a dispatch and a pass over memory) done in one pass.
//
//   rms_norm(out, x, w, eps)          out = w * RMSNorm(x)
//   add_rms_norm(x, residual, w, eps) residual = residual + x; x = w * RMSNorm(residual)
//   rope_neox(q, k, cos, sin)         q, k rotated in place (rotate-half form)
//   rope_neox_cache(q, k, v, cos, sin, cache, slots)
//                                     the same, and each token's rotated k and its v written
//                                     into its slot of the paged cache while in L1
//   silu_and_mul(out, x)              out = silu(x[:, :I]) * x[:, I:]
//
// float32 or bfloat16, all tensors of one dtype. Arithmetic is float32 and every value is
// rounded to the storage dtype where transformers' Llama/Qwen3 code rounds it (after the
// residual add, after the normalisation before the weight, after each rotary product, after
// the activation), so the results are transformers' to float32's own rounding and, in
// bfloat16, the same bits up to that. Rows run in parallel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "kvd_vec.h"

namespace {

using kvd::narrow;
using kvd::widen;

#if defined(KVD_VEC)
// The rows a vector at a time (kvd_vec.h), where a row is a multiple of the lanes wide: each
// value rounded where the scalar code rounds (Vec::round, Vec::store), sums in another order.
using kvd::Vec;
using V = Vec::V;
constexpr int64_t kLanes = Vec::kLanes;

template <typename T>
inline void norm_row_vec(T* out, const T* x, const T* w, int64_t E, float eps) {
  V ss = Vec::zero();
  for (int64_t e = 0; e < E; e += kLanes) {
    const V v = Vec::load(x + e);
    ss = Vec::fmadd(v, v, ss);
  }
  const V inv = Vec::set1(1.f / std::sqrt(Vec::sum(ss) / static_cast<float>(E) + eps));
  for (int64_t e = 0; e < E; e += kLanes)
    Vec::store(out + e, Vec::mul(Vec::load(w + e), Vec::round<T>(Vec::mul(Vec::load(x + e), inv))));
}

template <typename T>
inline void add_row_vec(T* res, const T* x, int64_t E) {
  for (int64_t e = 0; e < E; e += kLanes) Vec::store(res + e, Vec::add(Vec::load(res + e), Vec::load(x + e)));
}

template <typename T>
inline void silu_mul_row_vec(T* o, const T* g, const T* u, int64_t I) {
  const V one = Vec::set1(1.f);
  for (int64_t i = 0; i < I; i += kLanes) {
    const V x = Vec::load(g + i);
    const V e = kvd::exp_neg(Vec::neg_abs(x));  // e^-|x|
    const V sig = Vec::div(Vec::if_nonneg(x, one, e), Vec::add(one, e));
    Vec::store(o + i, Vec::mul(Vec::round<T>(Vec::mul(x, sig)), Vec::load(u + i)));
  }
}

template <typename T>
inline void rotate_vec(T* x, const T* c, const T* s, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += kLanes) {
    const V a = Vec::load(x + i), b = Vec::load(x + half + i);
    const V lo = Vec::add(Vec::round<T>(Vec::mul(a, Vec::load(c + i))),
                          Vec::round<T>(Vec::mul(Vec::neg(b), Vec::load(s + i))));
    const V hi = Vec::add(Vec::round<T>(Vec::mul(b, Vec::load(c + half + i))),
                          Vec::round<T>(Vec::mul(a, Vec::load(s + half + i))));
    Vec::store(x + i, lo);
    Vec::store(x + half + i, hi);
  }
}
#else
constexpr int64_t kLanes = 0;  // no vector rows: every row takes the scalar code
template <typename T> inline void norm_row_vec(T*, const T*, const T*, int64_t, float) {}
template <typename T> inline void add_row_vec(T*, const T*, int64_t) {}
template <typename T> inline void silu_mul_row_vec(T*, const T*, const T*, int64_t) {}
template <typename T> inline void rotate_vec(T*, const T*, const T*, int64_t) {}
#endif

// Whether rows n values wide take the vector functions (their width a multiple of the lanes).
inline bool vector_rows(int64_t n) { return kLanes > 0 && n % kLanes == 0; }

void check_rows(const torch::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": must be 2-D with contiguous rows");
  TORCH_CHECK(t.scalar_type() == dt, name, ": dtype differs from the others");
}

void check_dtype(at::ScalarType dt, const char* op) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": float32 or bfloat16 only");
}

template <typename T>
inline void norm_row(T* out, const T* x, const T* w, int64_t E, float eps) {
  float ss = 0.f;
  for (int64_t e = 0; e < E; ++e) ss += widen(x[e]) * widen(x[e]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(E) + eps);
  for (int64_t e = 0; e < E; ++e) out[e] = narrow<T>(widen(w[e]) * widen(narrow<T>(widen(x[e]) * inv)));
}

template <typename T>
void rms_norm_impl(torch::Tensor out, torch::Tensor x, torch::Tensor w, float eps) {
  const int64_t R = x.size(0), E = x.size(1);
  T* op = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const int64_t so = out.stride(0), sx = x.stride(0);
  const bool vec = vector_rows(E);
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      vec ? norm_row_vec(op + r * so, xp + r * sx, wp, E, eps) : norm_row(op + r * so, xp + r * sx, wp, E, eps);
  });
}

template <typename T>
void add_rms_norm_impl(torch::Tensor x, torch::Tensor res, torch::Tensor w, float eps) {
  const int64_t R = x.size(0), E = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = res.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const int64_t sx = x.stride(0), sr = res.stride(0);
  const bool vec = vector_rows(E);
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* xr = xp + r * sx;
      T* rr = rp + r * sr;
      if (vec) {
        add_row_vec(rr, xr, E);
        norm_row_vec(xr, rr, wp, E, eps);
        continue;
      }
      for (int64_t i = 0; i < E; ++i) rr[i] = narrow<T>(widen(rr[i]) + widen(xr[i]));
      norm_row(xr, rr, wp, E, eps);
    }
  });
}

template <typename T>
inline void rotate(T* x, const T* c, const T* s, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = widen(x[i]), b = widen(x[i + half]);
    // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product rounded
    x[i] = narrow<T>(widen(narrow<T>(a * widen(c[i]))) + widen(narrow<T>(-b * widen(s[i]))));
    x[i + half] = narrow<T>(widen(narrow<T>(b * widen(c[i + half]))) + widen(narrow<T>(a * widen(s[i + half]))));
  }
}

// The paged cache rope_neox_cache writes into: K and V of (num_blocks * block_size) slots
// of KVH * D values each, and one slot per token (checked in range before any write).
struct CacheSlots {
  void* k = nullptr;
  void* v = nullptr;
  const int64_t* slot = nullptr;
};

template <typename T>
void rope_impl(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
               CacheSlots cache) {
  const int64_t N = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), row = KVH * D;
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const T* vp = cache.slot != nullptr ? v.data_ptr<T>() : nullptr;
  const bool vec = vector_rows(D / 2);
  at::parallel_for(0, N, 8, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const T* c = cp + n * D;
      const T* s = sp + n * D;
      for (int64_t h = 0; h < H + KVH; ++h) {
        T* x = h < H ? qp + n * q.stride(0) + h * q.stride(1) : kp + n * k.stride(0) + (h - H) * k.stride(1);
        vec ? rotate_vec(x, c, s, D) : rotate(x, c, s, D);
      }
      if (vp == nullptr) continue;
      T* kc = static_cast<T*>(cache.k) + cache.slot[n] * row;
      T* vc = static_cast<T*>(cache.v) + cache.slot[n] * row;
      const T* vn = vp + n * v.stride(0);
      for (int64_t h = 0; h < KVH; ++h) {  // heads contiguous in the cache, strided in k and v
        std::memcpy(kc + h * D, kp + n * k.stride(0) + h * k.stride(1), D * sizeof(T));
        std::memcpy(vc + h * D, vn + h * v.stride(1), D * sizeof(T));
      }
    }
  });
}

template <typename T>
void silu_and_mul_impl(torch::Tensor out, torch::Tensor x) {
  const int64_t R = out.size(0), I = out.size(1);
  T* op = out.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const int64_t so = out.stride(0), sx = x.stride(0);
  const bool vec = vector_rows(I);
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = xp + r * sx;
      const T* u = g + I;
      T* o = op + r * so;
      if (vec) {
        silu_mul_row_vec(o, g, u, I);
        continue;
      }
      for (int64_t i = 0; i < I; ++i) o[i] = narrow<T>(widen(narrow<T>(kvd::silu(widen(g[i])))) * widen(u[i]));
    }
  });
}

}  // namespace

void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps) {
  const auto dt = x.scalar_type();
  check_dtype(dt, "rms_norm");
  check_rows(x, "x", dt);
  check_rows(out, "out", dt);
  TORCH_CHECK(out.sizes() == x.sizes(), "rms_norm: out and x differ in shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() && weight.scalar_type() == dt,
              "rms_norm: weight must be a contiguous (E,) of x's dtype");
  if (dt == at::kFloat)
    rms_norm_impl<float>(out, x, weight, static_cast<float>(eps));
  else
    rms_norm_impl<c10::BFloat16>(out, x, weight, static_cast<float>(eps));
}

void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  const auto dt = x.scalar_type();
  check_dtype(dt, "add_rms_norm");
  check_rows(x, "x", dt);
  check_rows(residual, "residual", dt);
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm: residual and x differ in shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() && weight.scalar_type() == dt,
              "add_rms_norm: weight must be a contiguous (E,) of x's dtype");
  if (dt == at::kFloat)
    add_rms_norm_impl<float>(x, residual, weight, static_cast<float>(eps));
  else
    add_rms_norm_impl<c10::BFloat16>(x, residual, weight, static_cast<float>(eps));
}

static void check_rope(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin,
                const char* op) {
  const auto dt = q.scalar_type();
  check_dtype(dt, op);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, op,
              ": q and k must be (N, heads, D) with contiguous heads");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && q.size(2) % 2 == 0, op, ": q and k disagree");
  TORCH_CHECK(k.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt, op, ": one dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == q.size(0) && cos.size(1) == q.size(2),
              op, ": cos and sin must be contiguous (N, D)");
}

void rope_neox(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  check_rope(q, k, cos, sin, "rope_neox");
  if (q.scalar_type() == at::kFloat)
    rope_impl<float>(q, k, k, cos, sin, {});
  else
    rope_impl<c10::BFloat16>(q, k, k, cos, sin, {});
}

void rope_neox_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor cache, torch::Tensor slots) {
  check_rope(q, k, cos, sin, "rope_neox_cache");
  TORCH_CHECK(v.dim() == 3 && v.sizes() == k.sizes() && v.stride(2) == 1 && v.scalar_type() == q.scalar_type(),
              "rope_neox_cache: v must be (N, KVH, D) like k, with contiguous heads");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous() && cache.size(3) == k.size(1) &&
                  cache.size(4) == k.size(2) && cache.scalar_type() == q.scalar_type(),
              "rope_neox_cache: cache must be a contiguous (2, num_blocks, block_size, KVH, D) of q's dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == q.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "rope_neox_cache: slots must be (N,) int64, one per token");
  const int64_t num_slots = cache.size(1) * cache.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < slots.size(0); ++n)
    TORCH_CHECK(slot[n] >= 0 && slot[n] < num_slots, "rope_neox_cache: slot ", slot[n], " of token ", n,
                " is outside the cache's ", num_slots, " slots");
  const int64_t half = cache.numel() / 2;
  if (q.scalar_type() == at::kFloat) {
    float* base = cache.data_ptr<float>();
    rope_impl<float>(q, k, v, cos, sin, {base, base + half, slot});
  } else {
    c10::BFloat16* base = cache.data_ptr<c10::BFloat16>();
    rope_impl<c10::BFloat16>(q, k, v, cos, sin, {base, base + half, slot});
  }
}

void silu_and_mul(torch::Tensor out, torch::Tensor x) {
  const auto dt = x.scalar_type();
  check_dtype(dt, "silu_and_mul");
  check_rows(x, "x", dt);
  check_rows(out, "out", dt);
  TORCH_CHECK(x.size(0) == out.size(0) && x.size(1) == 2 * out.size(1), "silu_and_mul: x must be (R, 2I), out (R, I)");
  if (dt == at::kFloat)
    silu_and_mul_impl<float>(out, x);
  else
    silu_and_mul_impl<c10::BFloat16>(out, x);
}
