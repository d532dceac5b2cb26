// swap_cache_layout, CUDA: move KV blocks between the worker's per-layer device layout and
// the block-major host layout in pinned memory, ordered on the caller's current stream
// (layouts, checks and the kernel body: swap_cache_layout.h).
//
// Device -> host is one gather kernel (one CUDA block per piece) into a staging buffer in
// slot order, then one cudaMemcpyAsync per run of consecutive slots: ONE copy when the
// slots are contiguous. Host -> device is the same in reverse: the runs into staging, then
// one scatter kernel. Staging memory comes from torch's caching allocator (stream-ordered,
// returned with the tensor: no global buffer that outlives its use). The kernel moves 16
// bytes at a time only when every base address and the piece size are 16-byte aligned,
// bytes otherwise. The layer addresses and block ids travel in one pinned tensor, copied
// without blocking the host; nothing synchronises, so callers that read the host side
// synchronise the stream first.
//
// The CPU build runs this plan on the CPU (`_swap_cache_layout_cuda_plan`), which is how
// its addressing is tested without a GPU.
#include "swap_cache_layout.h"

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

template <typename T>
__global__ void move_pieces(kvd_swap::Pieces g) {
  kvd_swap::move_piece<T>(g, blockIdx.x, threadIdx.x, blockDim.x);
}

}  // namespace

void swap_cache_layout_cuda(at::TensorList caches_list, const at::Tensor& host, const at::Tensor& block_ids,
                            const at::Tensor& slot_ids, bool to_host) {
  const std::vector<at::Tensor> caches(caches_list.begin(), caches_list.end());
  kvd_swap::check_inputs(caches, host, block_ids, slot_ids, to_host, /*cuda=*/true);
  const auto& c0 = caches[0];
  const c10::cuda::CUDAGuard guard(c0.device());
  const int64_t L = static_cast<int64_t>(caches.size()), n = block_ids.numel();
  if (n == 0) return;
  const int64_t chunk = kvd_swap::piece_bytes(c0), slot_bytes = L * 2 * chunk;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // [layer addresses..., block ids...] in pinned memory, one non-blocking copy; the caching
  // host allocator keeps the pinned block until that copy has run.
  at::Tensor index = at::empty({L + n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) idx[l] = reinterpret_cast<int64_t>(caches[l].data_ptr());
  std::copy_n(block_ids.data_ptr<int64_t>(), n, idx + L);
  at::Tensor dev_index = index.to(c0.device(), /*non_blocking=*/true);

  at::Tensor staging = at::empty({n * slot_bytes}, at::TensorOptions().device(c0.device()).dtype(at::kByte));
  const kvd_swap::Pieces g{dev_index.data_ptr<int64_t>(), dev_index.data_ptr<int64_t>() + L,
                           staging.data_ptr<uint8_t>(), L, c0.size(1), chunk, to_host};
  const bool vec = kvd_swap::aligned16(caches, staging.data_ptr(), chunk);
  auto kernel = [&] {
    const dim3 grid(static_cast<unsigned>(n * L * 2)), threads(kvd_swap::kLanes);
    if (vec)
      move_pieces<int4><<<grid, threads, 0, stream>>>(g);
    else
      move_pieces<uint8_t><<<grid, threads, 0, stream>>>(g);
    KVD_CUDA_CHECK(cudaGetLastError());
  };
  auto* hst = static_cast<uint8_t*>(host.data_ptr());
  auto* stg = staging.data_ptr<uint8_t>();
  if (to_host) kernel();
  for (const auto& r : kvd_swap::host_runs(slot_ids.data_ptr<int64_t>(), n, slot_bytes)) {
    if (to_host)
      KVD_CUDA_CHECK(cudaMemcpyAsync(hst + r.host_offset, stg + r.staging_offset, r.bytes, cudaMemcpyDeviceToHost,
                                     stream));
    else
      KVD_CUDA_CHECK(cudaMemcpyAsync(stg + r.staging_offset, hst + r.host_offset, r.bytes, cudaMemcpyHostToDevice,
                                     stream));
  }
  if (!to_host) kernel();
  // staging and dev_index go back to the caching allocator here; it hands their memory
  // only to work ordered after this stream's copies and kernels (same stream).
}

TORCH_LIBRARY_IMPL(kvd, CUDA, m) {
  m.impl("swap_cache_layout", &swap_cache_layout_cuda);
}
