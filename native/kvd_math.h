// What kvd's CPU kernels share, whatever the vector width: reading bfloat16 as float32, a
// vectorizable exp, and the rows of a sequence's paged KV in order.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvd {

inline float widen(float x) { return x; }

// bf16 is the top half of a float32: widening is a shift, which the compiler vectorizes
// (c10's own conversion, through a function call per element, it did not).
inline float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to the storage type the way torch does (round to nearest even for bf16).
template <typename T>
inline T narrow(float x) {
  return static_cast<T>(x);
}

// e^x for x <= 0, branch-free so that a loop calling it vectorizes: 2^(x log2 e) split
// into 2^n (built in the exponent bits) and 2^f, f in [-0.5, 0.5], by a degree-6
// polynomial. Relative error about 2e-7 (float32's own rounding); libm's scalar expf was
// most of these kernels' time. The vector version (kvd_vec.h) takes the same steps with
// these constants.
constexpr float kExpLowest = -87.f;  // inputs below are taken as this: e^-87 is near float32's smallest normal
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Poly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                               5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f,
                               1.f};  // 2^f by Horner's rule, the highest power first
inline float exp_neg(float x) {
  x = std::max(x, kExpLowest);
  const float t = x * kLog2e;
  const float n = std::nearbyint(t);
  const float f = t - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExp2Poly[i];
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

// x * sigmoid(x) for any x, through exp_neg of -|x|.
inline float silu(float x) {
  const float e = exp_neg(-std::fabs(x));
  const float sig = x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
  return x * sig;
}

// The rows of the tokens of one sequence's blocks, in order: token t of the sequence is row
// t % BS of block table[t / BS], each row tok_stride elements apart.
template <typename T>
struct Rows {
  const T* base;  // the cache (K or V) plus the kv head's offset
  const int64_t* table;
  int64_t bs, block_elems, tok_stride;
  int64_t blk = 0, off = 0;
  const T* next() {
    const T* p = base + table[blk] * block_elems + off * tok_stride;
    if (++off == bs) off = 0, ++blk;
    return p;
  }
};

// Rows come from blocks scattered through the cache, one head's part of each token's row:
// a pattern the hardware prefetcher does not follow, so each pass asks for the rows
// kAhead tokens on. (Measured out of cache at batch 64 it is worth a few percent at best,
// within this VM's noise; it costs nothing measurable in cache.) `prefetch_row<T, N>`
// asks for the cache lines of N values from `row` (prefetcht0).
constexpr int64_t kAhead = 16;
template <typename T, int N>
inline void prefetch_row(const T* row) {
  constexpr int kLines = (N * static_cast<int>(sizeof(T)) + 63) / 64;
  for (int i = 0; i < kLines; ++i) __builtin_prefetch(reinterpret_cast<const char*>(row) + 64 * i, 0, 3);
}

}  // namespace kvd
