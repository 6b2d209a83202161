// Helpers shared by the CUDA kernels: checked calls, the cache's page addressing.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/params.hpp"
#include "tqkv/error.hpp"

#define TQKV_CUDA_CHECK(call)                                                              \
  do {                                                                                     \
    const cudaError_t status_ = (call);                                                    \
    TQKV_CHECK(status_ == cudaSuccess, #call, " failed: ", cudaGetErrorString(status_)); \
  } while (0)

/// Checks the launch just made (configuration errors surface here, faults at the next sync).
#define TQKV_CUDA_CHECK_LAUNCH(what) TQKV_CUDA_CHECK(cudaPeekAtLastError())

namespace tqkv::gpu {

/// Makes `device` current for the calling thread for the lifetime of the guard.
class DeviceGuard {
 public:
  explicit DeviceGuard(Device device) {
    TQKV_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device.index != previous_) TQKV_CUDA_CHECK(cudaSetDevice(device.index));
    changed_ = device.index != previous_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

/// Copies of 16 or 8 bytes into shared memory by cp.async (sm_80+): they bypass registers and
/// complete in groups (commit, then wait until at most N groups are in flight).
__device__ __forceinline__ void cp_async(void* dst, const void* src, uint32_t bytes) {
  const uint32_t d = uint32_t(__cvta_generic_to_shared(dst));
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// Element i of x (ScalarType `type`: 0 float32, 1 float16, 2 bfloat16 bits) as a float, exactly.
__device__ __forceinline__ float load_element(const void* x, int type, size_t i) {
  if (type == 0) return static_cast<const float*>(x)[i];
  const uint16_t bits = static_cast<const uint16_t*>(x)[i];
  if (type == 1) return __half2float(__ushort_as_half(bits));
  return __uint_as_float(uint32_t(bits) << 16);
}

/// Token t's page within its sequence and slot within that page: a shift and a mask for pages
/// of a power-of-two size (the common case; a division costs ~20 instructions), else divisions.
__device__ __forceinline__ uint32_t page_index(const CacheView& c, uint64_t t) {
  return c.page_shift >= 0 ? uint32_t(t >> c.page_shift) : uint32_t(t / uint64_t(c.page_tokens));
}
__device__ __forceinline__ uint32_t page_slot(const CacheView& c, uint64_t t) {
  return c.page_shift >= 0 ? uint32_t(t) & uint32_t(c.page_tokens - 1)
                           : uint32_t(t % uint64_t(c.page_tokens));
}

/// The key (side 0) or value (side 1) block of KV head `head` holding token `t` of a sequence.
__device__ inline uint8_t* block_of(const CacheView& c, const uint32_t* pages, uint64_t t,
                                    int head, int side) {
  const uint32_t page = pages[page_index(c, t)];
  return c.pool + uint64_t(page) * c.layer_page_bytes +
         uint64_t(head) * (c.key_block_bytes + c.value_block_bytes) +
         (side ? c.key_block_bytes : 0u);
}

}  // namespace tqkv::gpu
