// swap_cache_layout, shared by the CPU op (swap_cache_layout.cpp) and the CUDA op
// (swap_cache_layout.cu): the input checks, the addressing both layouts agree on, the
// host <-> staging copy runs and the CUDA kernel's body.
//
//   caches[l]  (2, num_blocks, block_size, KVH, D)   per layer: K then V (the worker's layout)
//   host       (num_slots, L, 2, block_size, KVH, D)  one slot = one block, all layers
//   block_ids, slot_ids (n,) int64: block_ids[i] <-> slot_ids[i]
//
// A "piece" is one (block, layer, K|V) run of block_size*KVH*D elements; it is contiguous
// in both layouts. Piece p = (i * L + l) * 2 + kv, so pieces 2L*i .. 2L*(i+1)-1 are slot
// slot_ids[i] byte for byte: a staging buffer of n slots in piece order is exactly the
// host bytes of those slots, in the order of slot_ids.
//
// The kernel body is a host-and-device function so that the CPU build can run the CUDA
// op's whole plan (`_swap_cache_layout_cuda_plan`: staging, kernel grid, copy runs) where
// no GPU is; the tests check that plan against the reference.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define KVD_HOST_DEVICE __host__ __device__
#else
#define KVD_HOST_DEVICE
#endif

namespace kvd_swap {
namespace {

// Every bad input raises before a byte moves: no crash, no partial copy. `cuda`: the
// caches must be on one CUDA device and host in pinned memory; else all on the CPU.
inline void check_inputs(const std::vector<at::Tensor>& caches, const at::Tensor& host, const at::Tensor& block_ids,
                         const at::Tensor& slot_ids, bool to_host, bool cuda) {
  TORCH_CHECK(!caches.empty(), "swap_cache_layout: caches is empty");
  const auto& c0 = caches[0];
  TORCH_CHECK(c0.dim() == 5 && c0.size(0) == 2, "swap_cache_layout: caches[0] must be (2, num_blocks, block_size, "
              "kv_heads, head_dim), got ", c0.sizes());
  for (size_t l = 0; l < caches.size(); ++l) {
    TORCH_CHECK(caches[l].sizes() == c0.sizes(), "swap_cache_layout: caches[", l, "] shape ", caches[l].sizes(),
                " differs from caches[0] ", c0.sizes());
    TORCH_CHECK(caches[l].scalar_type() == c0.scalar_type(), "swap_cache_layout: caches[", l, "] dtype differs");
    TORCH_CHECK(caches[l].is_contiguous() && caches[l].device() == c0.device() && caches[l].is_cuda() == cuda,
                "swap_cache_layout: caches[", l, "] must be a contiguous ", cuda ? "CUDA" : "CPU",
                " tensor on caches[0]'s device");
  }
  const int64_t L = static_cast<int64_t>(caches.size());
  TORCH_CHECK(host.dim() == 6 && host.size(1) == L && host.size(2) == 2 && host.size(3) == c0.size(2) &&
                  host.size(4) == c0.size(3) && host.size(5) == c0.size(4),
              "swap_cache_layout: host must be (num_slots, ", L, ", 2, ", c0.size(2), ", ", c0.size(3), ", ",
              c0.size(4), "), got ", host.sizes());
  TORCH_CHECK(host.scalar_type() == c0.scalar_type(), "swap_cache_layout: host dtype ", host.scalar_type(),
              " differs from the caches' ", c0.scalar_type());
  TORCH_CHECK(host.is_contiguous() && host.device().is_cpu(), "swap_cache_layout: host must be contiguous, on the CPU");
  TORCH_CHECK(!cuda || host.is_pinned(), "swap_cache_layout: host must be pinned memory for CUDA caches");
  TORCH_CHECK(block_ids.dim() == 1 && slot_ids.dim() == 1 && block_ids.scalar_type() == at::kLong &&
                  slot_ids.scalar_type() == at::kLong && block_ids.is_contiguous() && slot_ids.is_contiguous() &&
                  block_ids.device().is_cpu() && slot_ids.device().is_cpu(),
              "swap_cache_layout: block_ids and slot_ids must be 1-D contiguous int64 CPU tensors");
  TORCH_CHECK(block_ids.numel() == slot_ids.numel(), "swap_cache_layout: ", block_ids.numel(), " block ids but ",
              slot_ids.numel(), " slot ids");
  const int64_t nb = c0.size(1), ns = host.size(0), n = block_ids.numel();
  const int64_t* b = block_ids.data_ptr<int64_t>();
  const int64_t* s = slot_ids.data_ptr<int64_t>();
  std::vector<char> seen(to_host ? ns : nb, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(b[i] >= 0 && b[i] < nb, "swap_cache_layout: block id ", b[i], " at ", i, " outside [0, ", nb, ")");
    TORCH_CHECK(s[i] >= 0 && s[i] < ns, "swap_cache_layout: slot id ", s[i], " at ", i, " outside [0, ", ns, ")");
    const int64_t dst = to_host ? s[i] : b[i];  // two sources into one destination would race
    TORCH_CHECK(!seen[dst], "swap_cache_layout: ", to_host ? "slot" : "block", " id ", dst, " is written twice");
    seen[dst] = 1;
  }
}

// Bytes of one piece.
inline int64_t piece_bytes(const at::Tensor& c0) { return c0.size(2) * c0.size(3) * c0.size(4) * c0.element_size(); }

// One copy between host slots and the staging buffer: bytes at host + host_offset and
// staging + staging_offset.
struct Run {
  int64_t host_offset, staging_offset, bytes;
};

// Runs of consecutive slot ids merge into one copy: contiguous slots (the fast path) are
// one run, scattered ones one run per slot.
inline std::vector<Run> host_runs(const int64_t* slots, int64_t n, int64_t slot_bytes) {
  std::vector<Run> runs;
  for (int64_t i = 0; i < n; ++i) {
    if (!runs.empty() && slots[i] == slots[i - 1] + 1)
      runs.back().bytes += slot_bytes;
    else
      runs.push_back({slots[i] * slot_bytes, i * slot_bytes, slot_bytes});
  }
  return runs;
}

// What the kernel needs: the layers' base addresses and the block ids (device memory on
// CUDA), the staging buffer, and the direction.
struct Pieces {
  const int64_t* layer_ptrs;
  const int64_t* block_ids;
  uint8_t* staging;
  int64_t layers, num_blocks, piece_bytes;
  bool to_staging;
};

// Piece p, lanes lane, lane + lanes, ... of it, T at a time (T = 16-byte vector only when
// every address and piece_bytes are 16-byte aligned; bytes otherwise).
template <typename T>
KVD_HOST_DEVICE inline void move_piece(const Pieces& g, int64_t p, int64_t lane, int64_t lanes) {
  const int64_t kv = p % 2, l = (p / 2) % g.layers, i = p / (2 * g.layers);
  uint8_t* dev = reinterpret_cast<uint8_t*>(g.layer_ptrs[l]) + (kv * g.num_blocks + g.block_ids[i]) * g.piece_bytes;
  uint8_t* stg = g.staging + p * g.piece_bytes;
  T* dst = reinterpret_cast<T*>(g.to_staging ? stg : dev);
  const T* src = reinterpret_cast<const T*>(g.to_staging ? dev : stg);
  const int64_t count = g.piece_bytes / static_cast<int64_t>(sizeof(T));
  for (int64_t j = lane; j < count; j += lanes) dst[j] = src[j];
}

inline bool aligned16(const std::vector<at::Tensor>& caches, const void* staging, int64_t piece) {
  if (piece % 16 || reinterpret_cast<uintptr_t>(staging) % 16) return false;
  for (const auto& c : caches)
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16) return false;
  return true;
}

constexpr int kLanes = 256;  // threads per CUDA block; one block per piece

}  // namespace
}  // namespace kvd_swap
