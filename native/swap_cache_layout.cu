// swap_cache_layout, CUDA: move KV blocks between the worker's per-layer device layout and
// the block-major host layout (pinned memory), ordered on the caller's current stream.
//
//   caches[l]  (2, num_blocks, block_size, KVH, D) on the GPU   host (slots, L, 2, block_size, KVH, D) pinned
//
// Fast path (host slots contiguous, s0..s0+n-1): the host bytes of those slots are one
// contiguous range, so device->host is one gather kernel into a staging buffer and ONE
// cudaMemcpyAsync; host->device is one cudaMemcpyAsync into staging and one scatter
// kernel. Scattered slots: the same kernel, then one copy per block (a slot's L*2 pieces
// are contiguous on the host). Staging memory comes from torch's caching allocator
// (stream-ordered, freed with the tensor: no global buffer that outlives its use). The
// kernels copy 16 bytes at a time only when every base pointer and the piece size are
// 16-byte aligned, bytes otherwise. Nothing synchronises: callers that need the data on
// the host synchronise the stream. Inputs are checked by the CPU op's rules first.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <vector>

namespace {

#define KVD_CUDA_CHECK(expr)                                                              \
  do {                                                                                    \
    cudaError_t err__ = (expr);                                                           \
    TORCH_CHECK(err__ == cudaSuccess, "swap_cache_layout: ", cudaGetErrorString(err__)); \
  } while (0)

// One CUDA block per (block i, layer l, K|V) piece; piece p sits at staging + p * chunk.
template <typename T>
__global__ void move_pieces(const int64_t* __restrict__ layer_ptrs, const int64_t* __restrict__ block_ids,
                            uint8_t* __restrict__ staging, int64_t L, int64_t num_blocks, int64_t chunk,
                            bool to_staging) {
  const int64_t p = blockIdx.x;  // piece index = (i * L + l) * 2 + kv
  const int64_t kv = p % 2, l = (p / 2) % L, i = p / (2 * L);
  uint8_t* dev = reinterpret_cast<uint8_t*>(layer_ptrs[l]) + (kv * num_blocks + block_ids[i]) * chunk;
  uint8_t* stg = staging + p * chunk;
  T* dst = reinterpret_cast<T*>(to_staging ? stg : dev);
  const T* src = reinterpret_cast<const T*>(to_staging ? dev : stg);
  for (int64_t j = threadIdx.x; j < chunk / static_cast<int64_t>(sizeof(T)); j += blockDim.x) dst[j] = src[j];
}

bool aligned16(const std::vector<at::Tensor>& caches, const at::Tensor& staging, int64_t chunk) {
  if (chunk % 16 || reinterpret_cast<uintptr_t>(staging.data_ptr()) % 16) return false;
  for (const auto& c : caches)
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16) return false;
  return true;
}

}  // namespace

void swap_cache_layout_cuda(at::TensorList caches_list, const at::Tensor& host, const at::Tensor& block_ids,
                            const at::Tensor& slot_ids, bool to_host) {
  std::vector<at::Tensor> caches(caches_list.begin(), caches_list.end());
  TORCH_CHECK(!caches.empty() && caches[0].is_cuda(), "swap_cache_layout: caches must be CUDA tensors");
  TORCH_CHECK(host.device().is_cpu() && host.is_pinned() && host.is_contiguous(),
              "swap_cache_layout: host must be contiguous pinned CPU memory");
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const auto& c0 = caches[0];
  for (const auto& c : caches)
    TORCH_CHECK(c.sizes() == c0.sizes() && c.scalar_type() == c0.scalar_type() && c.is_contiguous() &&
                    c.device() == c0.device(), "swap_cache_layout: caches differ in shape, dtype, device or layout");
  const int64_t L = static_cast<int64_t>(caches.size()), n = block_ids.numel(), nb = c0.size(1);
  TORCH_CHECK(host.dim() == 6 && host.size(1) == L && host.size(2) == 2 && host.size(3) == c0.size(2) &&
                  host.size(4) == c0.size(3) && host.size(5) == c0.size(4) && host.scalar_type() == c0.scalar_type(),
              "swap_cache_layout: host shape or dtype does not match the caches");
  TORCH_CHECK(block_ids.device().is_cpu() && slot_ids.device().is_cpu() && block_ids.scalar_type() == at::kLong &&
                  slot_ids.scalar_type() == at::kLong && slot_ids.numel() == n,
              "swap_cache_layout: block_ids and slot_ids must be equal-length int64 CPU tensors");
  const int64_t* b = block_ids.data_ptr<int64_t>();
  const int64_t* s = slot_ids.data_ptr<int64_t>();
  bool contiguous = true;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(b[i] >= 0 && b[i] < nb, "swap_cache_layout: block id ", b[i], " outside [0, ", nb, ")");
    TORCH_CHECK(s[i] >= 0 && s[i] < host.size(0), "swap_cache_layout: slot id ", s[i], " out of range");
    contiguous = contiguous && (i == 0 || s[i] == s[i - 1] + 1);
  }
  if (n == 0) return;
  const int64_t chunk = c0.size(2) * c0.size(3) * c0.size(4) * c0.element_size();
  const int64_t slot_bytes = L * 2 * chunk;
  const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream();
  cudaStream_t stream = cur.stream();
  auto dev_opts = at::TensorOptions().device(c0.device()).dtype(at::kLong);
  std::vector<int64_t> ptrs(L);
  for (int64_t l = 0; l < L; ++l) ptrs[l] = reinterpret_cast<int64_t>(caches[l].data_ptr());
  at::Tensor layer_ptrs = at::tensor(ptrs, at::kLong).to(c0.device(), /*non_blocking=*/false);
  at::Tensor dev_blocks = block_ids.to(dev_opts.device(), /*non_blocking=*/false);
  at::Tensor staging = at::empty({n * slot_bytes}, at::TensorOptions().device(c0.device()).dtype(at::kByte));
  uint8_t* stg = staging.data_ptr<uint8_t>();
  uint8_t* hst = static_cast<uint8_t*>(host.data_ptr());
  const bool vec = aligned16(caches, staging, chunk);
  auto launch = [&](bool to_staging) {
    const dim3 grid(static_cast<unsigned>(n * L * 2)), threads(256);
    if (vec)
      move_pieces<int4><<<grid, threads, 0, stream>>>(layer_ptrs.data_ptr<int64_t>(), dev_blocks.data_ptr<int64_t>(),
                                                      stg, L, nb, chunk, to_staging);
    else
      move_pieces<uint8_t><<<grid, threads, 0, stream>>>(layer_ptrs.data_ptr<int64_t>(),
                                                         dev_blocks.data_ptr<int64_t>(), stg, L, nb, chunk, to_staging);
    KVD_CUDA_CHECK(cudaGetLastError());
  };
  if (to_host) {
    launch(true);
    if (contiguous) {
      KVD_CUDA_CHECK(cudaMemcpyAsync(hst + s[0] * slot_bytes, stg, n * slot_bytes, cudaMemcpyDeviceToHost, stream));
    } else {
      for (int64_t i = 0; i < n; ++i)
        KVD_CUDA_CHECK(cudaMemcpyAsync(hst + s[i] * slot_bytes, stg + i * slot_bytes, slot_bytes,
                                       cudaMemcpyDeviceToHost, stream));
    }
  } else {
    if (contiguous) {
      KVD_CUDA_CHECK(cudaMemcpyAsync(stg, hst + s[0] * slot_bytes, n * slot_bytes, cudaMemcpyHostToDevice, stream));
    } else {
      for (int64_t i = 0; i < n; ++i)
        KVD_CUDA_CHECK(cudaMemcpyAsync(stg + i * slot_bytes, hst + s[i] * slot_bytes, slot_bytes,
                                       cudaMemcpyHostToDevice, stream));
    }
    launch(false);
  }
  // staging, layer_ptrs and dev_blocks go back to the caching allocator here; it hands
  // their memory only to work ordered after this stream's copies (same stream).
}

TORCH_LIBRARY_IMPL(kvd, CUDA, m) {
  m.impl("swap_cache_layout", &swap_cache_layout_cuda);
}
