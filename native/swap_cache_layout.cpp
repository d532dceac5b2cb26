// swap_cache_layout on the CPU: move KV blocks between the worker's per-layer layout and
// the block-major host layout (layouts and checks: swap_cache_layout.h).
//
// Every (block, layer, K|V) piece is one contiguous run in both layouts, so the op is
// n * L * 2 memcpys, parallel over (block, layer). On the CPU the contiguous-slot case and
// the scattered case are the same single pass; the distinction (one staging copy vs
// per-run copies) matters for the CUDA build.
//
// `_swap_cache_layout_cuda_plan` runs the CUDA op's algorithm on CPU tensors: the same
// checks, one staging buffer, the kernel body over the whole grid (every CUDA block's
// lanes in turn, 16-byte vectors or bytes by the same alignment rule) and the same host
// copy runs, memcpy standing in for cudaMemcpyAsync. It exists so that the CUDA build's
// addressing and copy plan are tested where no GPU is.
#include "swap_cache_layout.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

struct alignas(16) Vec16 {  // the host's stand-in for CUDA's int4
  int32_t v[4];
};

std::vector<at::Tensor> as_vector(at::TensorList list) { return {list.begin(), list.end()}; }

}  // namespace

void swap_cache_layout_cpu(at::TensorList caches_list, const at::Tensor& host, const at::Tensor& block_ids,
                           const at::Tensor& slot_ids, bool to_host) {
  const auto caches = as_vector(caches_list);
  kvd_swap::check_inputs(caches, host, block_ids, slot_ids, to_host, /*cuda=*/false);
  const int64_t L = static_cast<int64_t>(caches.size()), n = block_ids.numel();
  const int64_t nb = caches[0].size(1), chunk = kvd_swap::piece_bytes(caches[0]);
  std::vector<char*> cache_ptr(L);
  for (int64_t l = 0; l < L; ++l) cache_ptr[l] = static_cast<char*>(caches[l].data_ptr());
  char* host_ptr = static_cast<char*>(host.data_ptr());
  const int64_t* b = block_ids.data_ptr<int64_t>();
  const int64_t* s = slot_ids.data_ptr<int64_t>();
  at::parallel_for(0, n * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / L, l = idx % L;
      char* k = cache_ptr[l] + b[i] * chunk;         // (0, block)
      char* v = cache_ptr[l] + (nb + b[i]) * chunk;  // (1, block)
      char* h = host_ptr + (s[i] * L + l) * 2 * chunk;
      if (to_host) {
        std::memcpy(h, k, chunk);
        std::memcpy(h + chunk, v, chunk);
      } else {
        std::memcpy(k, h, chunk);
        std::memcpy(v, h + chunk, chunk);
      }
    }
  });
}

// Returns how many host copies the plan issued (the CUDA op's cudaMemcpyAsync count).
int64_t swap_cache_layout_cuda_plan(at::TensorList caches_list, const at::Tensor& host, const at::Tensor& block_ids,
                                    const at::Tensor& slot_ids, bool to_host, bool allow_vectors) {
  const auto caches = as_vector(caches_list);
  kvd_swap::check_inputs(caches, host, block_ids, slot_ids, to_host, /*cuda=*/false);
  const int64_t L = static_cast<int64_t>(caches.size()), n = block_ids.numel();
  if (n == 0) return 0;
  const int64_t chunk = kvd_swap::piece_bytes(caches[0]), slot_bytes = L * 2 * chunk;
  std::vector<int64_t> layer_ptrs(L);
  for (int64_t l = 0; l < L; ++l) layer_ptrs[l] = reinterpret_cast<int64_t>(caches[l].data_ptr());
  at::Tensor staging = at::empty({n * slot_bytes}, at::TensorOptions().dtype(at::kByte));
  const kvd_swap::Pieces g{layer_ptrs.data(), block_ids.data_ptr<int64_t>(), staging.data_ptr<uint8_t>(),
                           L, caches[0].size(1), chunk, to_host};
  const bool vec = allow_vectors && kvd_swap::aligned16(caches, staging.data_ptr(), chunk);
  auto kernel = [&] {
    for (int64_t p = 0; p < n * L * 2; ++p)
      for (int64_t lane = 0; lane < kvd_swap::kLanes; ++lane) {
        if (vec)
          kvd_swap::move_piece<Vec16>(g, p, lane, kvd_swap::kLanes);
        else
          kvd_swap::move_piece<uint8_t>(g, p, lane, kvd_swap::kLanes);
      }
  };
  const auto runs = kvd_swap::host_runs(slot_ids.data_ptr<int64_t>(), n, slot_bytes);
  auto* hst = static_cast<uint8_t*>(host.data_ptr());
  auto* stg = staging.data_ptr<uint8_t>();
  if (to_host) kernel();
  for (const auto& r : runs) {
    if (to_host)
      std::memcpy(hst + r.host_offset, stg + r.staging_offset, r.bytes);
    else
      std::memcpy(stg + r.staging_offset, hst + r.host_offset, r.bytes);
  }
  if (!to_host) kernel();
  return static_cast<int64_t>(runs.size());
}

TORCH_LIBRARY(kvd, m) {
  m.def("swap_cache_layout(Tensor(a!)[] caches, Tensor(b!) host, Tensor block_ids, Tensor slot_ids, bool to_host) -> ()");
  m.def("_swap_cache_layout_cuda_plan(Tensor(a!)[] caches, Tensor(b!) host, Tensor block_ids, Tensor slot_ids, "
        "bool to_host, bool allow_vectors) -> int");
}

TORCH_LIBRARY_IMPL(kvd, CPU, m) {
  m.impl("swap_cache_layout", &swap_cache_layout_cpu);
  m.impl("_swap_cache_layout_cuda_plan", &swap_cache_layout_cuda_plan);
}
