// Where tqkv computes: the CPU or an NVIDIA GPU. The CUDA backend is optional: a build without it
// answers every GPU request with a clear tqkv::Error instead of failing at link or run time.
//
// GPU work is asynchronous and ordered on a CUDA stream (CudaStream is the same type as
// cudaStream_t; nullptr is the default stream). Calls that must report bad input (an append of
// non-finite keys, say) wait for their stream before they return; attention does not.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct CUstream_st;

namespace tqkv {

using CudaStream = CUstream_st*;

enum class DeviceKind : uint8_t { cpu = 0, cuda = 1 };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;  ///< the CUDA device number (cuda only)

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {DeviceKind::cuda, index}; }
  bool is_cuda() const { return kind == DeviceKind::cuda; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

/// "cpu" or "cuda:N".
std::string to_string(Device device);
/// Parses "cpu", "cuda" (device 0) or "cuda:N"; throws tqkv::Error otherwise.
Device parse_device(const std::string& name);

/// True when this build includes the CUDA backend.
bool cuda_backend_built();

struct GpuInfo {
  int index = 0;
  std::string name;
  int compute_major = 0, compute_minor = 0;
  size_t memory_bytes = 0;
  int multiprocessors = 0;
};

/// The GPUs the CUDA backend sees. Throws tqkv::Error when no CUDA backend was built, or when the
/// CUDA runtime reports an error (message included); returns an empty list when there is no GPU.
std::vector<GpuInfo> list_gpus();

/// Throws tqkv::Error unless `device` is the CPU or a GPU this process can use.
void check_device(Device device);

/// Waits until all work queued on `stream` of `device` has finished (reports its errors).
void synchronize(Device device, CudaStream stream = nullptr);

/// A block of memory on a device (plain host memory for the CPU), freed when it goes.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device device, size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  Device device() const { return device_; }
  size_t bytes() const { return bytes_; }
  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  /// Copies `bytes` from host memory into the buffer at `offset` (waits for the copy).
  void upload(const void* host, size_t bytes, size_t offset = 0);
  /// Copies `bytes` from the buffer at `offset` into host memory (waits for the copy).
  void download(void* host, size_t bytes, size_t offset = 0) const;
  /// Sets every byte to `value` (waits).
  void fill(uint8_t value);

 private:
  Device device_;
  size_t bytes_ = 0;
  void* data_ = nullptr;
};

}  // namespace tqkv
