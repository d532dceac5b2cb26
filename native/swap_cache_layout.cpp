// swap_cache_layout: move KV blocks between the worker's per-layer layout and the
// block-major host layout, on the CPU.
//
//   caches[l]  (2, num_blocks, block_size, KVH, D)   per layer: K then V (the worker's layout)
//   host       (num_slots, L, 2, block_size, KVH, D)  one slot = one block, all layers
//   block_ids, slot_ids (n,) int64: block_ids[i] <-> slot_ids[i]
//   to_host: caches -> host, else host -> caches
//
// Every (block, layer, K|V) piece is one contiguous run of block_size*KVH*D elements in
// both layouts, so the op is n * L * 2 memcpys, parallel over (block, layer). On the CPU
// the contiguous-slot case and the scattered case are the same single pass; the
// distinction (one staging copy vs per-block copies) matters for the CUDA build.
// Every bad input raises before a byte moves: no crash, no partial copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

void check_inputs(const std::vector<at::Tensor>& caches, const at::Tensor& host, const at::Tensor& block_ids,
                  const at::Tensor& slot_ids, bool to_host) {
  TORCH_CHECK(!caches.empty(), "swap_cache_layout: caches is empty");
  const auto& c0 = caches[0];
  TORCH_CHECK(c0.dim() == 5 && c0.size(0) == 2, "swap_cache_layout: caches[0] must be (2, num_blocks, block_size, "
              "kv_heads, head_dim), got ", c0.sizes());
  for (size_t l = 0; l < caches.size(); ++l) {
    TORCH_CHECK(caches[l].sizes() == c0.sizes(), "swap_cache_layout: caches[", l, "] shape ", caches[l].sizes(),
                " differs from caches[0] ", c0.sizes());
    TORCH_CHECK(caches[l].scalar_type() == c0.scalar_type(), "swap_cache_layout: caches[", l, "] dtype differs");
    TORCH_CHECK(caches[l].is_contiguous() && caches[l].device().is_cpu(),
                "swap_cache_layout: caches[", l, "] must be a contiguous CPU tensor");
  }
  const int64_t L = static_cast<int64_t>(caches.size());
  TORCH_CHECK(host.dim() == 6 && host.size(1) == L && host.size(2) == 2 && host.size(3) == c0.size(2) &&
                  host.size(4) == c0.size(3) && host.size(5) == c0.size(4),
              "swap_cache_layout: host must be (num_slots, ", L, ", 2, ", c0.size(2), ", ", c0.size(3), ", ",
              c0.size(4), "), got ", host.sizes());
  TORCH_CHECK(host.scalar_type() == c0.scalar_type(), "swap_cache_layout: host dtype ", host.scalar_type(),
              " differs from the caches' ", c0.scalar_type());
  TORCH_CHECK(host.is_contiguous() && host.device().is_cpu(), "swap_cache_layout: host must be contiguous, on the CPU");
  TORCH_CHECK(block_ids.dim() == 1 && slot_ids.dim() == 1 && block_ids.scalar_type() == at::kLong &&
                  slot_ids.scalar_type() == at::kLong && block_ids.is_contiguous() && slot_ids.is_contiguous(),
              "swap_cache_layout: block_ids and slot_ids must be 1-D contiguous int64");
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

}  // namespace

void swap_cache_layout_cpu(at::TensorList caches_list, const at::Tensor& host, const at::Tensor& block_ids,
                           const at::Tensor& slot_ids, bool to_host) {
  std::vector<at::Tensor> caches(caches_list.begin(), caches_list.end());
  check_inputs(caches, host, block_ids, slot_ids, to_host);
  const int64_t L = static_cast<int64_t>(caches.size()), n = block_ids.numel();
  const int64_t nb = caches[0].size(1);
  const int64_t chunk = caches[0].size(2) * caches[0].size(3) * caches[0].size(4) * caches[0].element_size();
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

TORCH_LIBRARY(kvd, m) {
  m.def("swap_cache_layout(Tensor(a!)[] caches, Tensor(b!) host, Tensor block_ids, Tensor slot_ids, bool to_host) -> ()");
}

TORCH_LIBRARY_IMPL(kvd, CPU, m) {
  m.impl("swap_cache_layout", &swap_cache_layout_cpu);
}
