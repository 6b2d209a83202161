// The CUDA backend's device queries and memory. Every runtime call is checked.
#include <algorithm>
#include <vector>

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

void* allocate_host(size_t bytes) {
  void* p = nullptr;
  const cudaError_t status = cudaMallocHost(&p, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw Error(detail::concat("cannot allocate ", bytes, " bytes of page-locked host memory: ",
                               cudaGetErrorString(status)));
  }
  return p;
}

void release_host(void* p) noexcept {
  if (p != nullptr) cudaFreeHost(p);
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

void* create_event(Device device) {
  DeviceGuard guard(device);
  cudaEvent_t event = nullptr;
  TQKV_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return event;
}

void destroy_event(void* event) noexcept {
  if (event == nullptr) return;
  cudaEventSynchronize(static_cast<cudaEvent_t>(event));  // what it marks may read its owner's
  cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

void record_event(Device device, void* event, CudaStream stream) {
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), stream));
}

void wait_event(void* event) {
  TQKV_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
}

void copy(Device device, void* dst, const void* src, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
}

void copy_2d(Device device, void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
             size_t width, size_t height, CudaStream stream) {
  if (width == 0 || height == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                    cudaMemcpyDeviceToDevice, stream));
}

void fill(Device device, void* p, uint8_t value, size_t bytes, CudaStream stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  TQKV_CUDA_CHECK(cudaMemsetAsync(p, value, bytes, stream));
}

namespace {

// The median over `repeats` of the mean time of `inner` back-to-back calls of `queue` (which
// queues work on `stream`), after 3 calls to warm up, in microseconds.
double median_us(cudaStream_t stream, const std::function<void()>& queue, int repeats,
                 int inner) {
  cudaEvent_t start = nullptr, stop = nullptr;
  std::vector<float> times;
  try {
    TQKV_CUDA_CHECK(cudaEventCreate(&start));
    TQKV_CUDA_CHECK(cudaEventCreate(&stop));
    for (int i = 0; i < 3; ++i) queue();
    for (int r = 0; r < repeats; ++r) {
      TQKV_CUDA_CHECK(cudaEventRecord(start, stream));
      for (int i = 0; i < inner; ++i) queue();
      TQKV_CUDA_CHECK(cudaEventRecord(stop, stream));
      TQKV_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      TQKV_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms * 1e3f / float(inner));
    }
  } catch (...) {
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

double time_graph_us(Device device, const std::function<void(CudaStream)>& work, int repeats,
                     int inner) {
  DeviceGuard guard(device);
  cudaStream_t stream = nullptr;
  TQKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  double us = 0;
  try {
    TQKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    try {
      work(stream);
    } catch (...) {
      cudaStreamEndCapture(stream, &graph);
      throw;
    }
    TQKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    TQKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    us = median_us(stream, [&] { TQKV_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }, repeats,
                   inner);
  } catch (...) {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    throw;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return us;
}

double time_stream_us(Device device, const std::function<void(CudaStream)>& work, int repeats,
                      int inner) {
  DeviceGuard guard(device);
  cudaStream_t stream = nullptr;
  TQKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  double us = 0;
  try {
    us = median_us(stream, [&] { work(stream); }, repeats, inner);
  } catch (...) {
    cudaStreamDestroy(stream);
    throw;
  }
  cudaStreamDestroy(stream);
  return us;
}

int multiprocessors(Device device) {
  int n = 0;
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index));
  return n;
}

}  // namespace gpu
}  // namespace tqkv
