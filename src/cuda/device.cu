// The CUDA backend's device queries and memory. Every runtime call is checked.
#include "cuda/backend.hpp"
#include "cuda/common.cuh"
#include "tqkv/device.hpp"

namespace tqkv {

bool cuda_backend_built() { return true; }

std::vector<GpuInfo> list_gpus() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear it
    return {};
  }
  TQKV_CUDA_CHECK(status);
  std::vector<GpuInfo> gpus;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    TQKV_CUDA_CHECK(cudaGetDeviceProperties(&p, i));
    gpus.push_back({i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
  }
  return gpus;
}

void check_device(Device device) {
  if (!device.is_cuda()) return;
  const auto gpus = list_gpus();
  TQKV_CHECK(device.index >= 0 && size_t(device.index) < gpus.size(), "device ",
             to_string(device), " does not exist: this machine has ", gpus.size(), " GPU",
             gpus.size() == 1 ? "" : "s");
}

void synchronize(Device device, CudaStream stream) {
  if (!device.is_cuda()) return;
  gpu::DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

namespace gpu {

void* allocate(Device device, size_t bytes) {
  if (bytes == 0) return nullptr;
  DeviceGuard guard(device);
  void* p = nullptr;
  const cudaError_t status = cudaMalloc(&p, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw Error(detail::concat("cannot allocate ", bytes, " bytes on ", to_string(device), ": ",
                               cudaGetErrorString(status)));
  }
  return p;
}

void release(Device device, void* p) noexcept {
  if (p == nullptr) return;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device.index);
  cudaFree(p);
  cudaSetDevice(previous);
}

void upload(Device device, void* dst, const void* src, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
}

void download(Device device, void* dst, const void* src, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  TQKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void copy(Device device, void* dst, const void* src, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
}

void fill(Device device, void* p, uint8_t value, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemsetAsync(p, value, bytes, stream));
}

int multiprocessors(Device device) {
  int n = 0;
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index));
  return n;
}

}  // namespace gpu
}  // namespace tqkv
