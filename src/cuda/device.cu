// The CUDA backend's device queries. Every runtime call is checked.
#include <cuda_runtime.h>

#include "tqkv/device.hpp"
#include "tqkv/error.hpp"

#define TQKV_CUDA_CHECK(call)                                                              \
  do {                                                                                     \
    const cudaError_t status_ = (call);                                                    \
    TQKV_CHECK(status_ == cudaSuccess, #call, " failed: ", cudaGetErrorString(status_)); \
  } while (0)

namespace tqkv {

bool cuda_backend_built() { return true; }

std::vector<GpuInfo> list_gpus() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) return {};
  TQKV_CUDA_CHECK(status);
  std::vector<GpuInfo> gpus;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    TQKV_CUDA_CHECK(cudaGetDeviceProperties(&p, i));
    gpus.push_back({i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
  }
  return gpus;
}

}  // namespace tqkv
