// Device names and DeviceBuffer, for every build (the GPU parts go through src/cuda/backend.hpp).
#include "tqkv/device.hpp"

#include <cstdlib>
#include <cstring>

#include "cuda/backend.hpp"
#include "tqkv/error.hpp"

namespace tqkv {

std::string to_string(Device device) {
  return device.is_cuda() ? "cuda:" + std::to_string(device.index) : "cpu";
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::cpu();
  if (name == "cuda") return Device::cuda(0);
  if (name.rfind("cuda:", 0) == 0 && name.size() > 5 && name.size() <= 9 &&
      name.find_first_not_of("0123456789", 5) == std::string::npos)
    return Device::cuda(std::atoi(name.c_str() + 5));
  throw Error("unknown device '" + name + "' (expected cpu, cuda or cuda:N)");
}

DeviceBuffer::DeviceBuffer(Device device, size_t bytes) : device_(device), bytes_(bytes) {
  if (device.is_cuda()) {
    data_ = gpu::allocate(device, bytes);
  } else if (bytes > 0) {
    data_ = std::malloc(bytes);
    TQKV_CHECK(data_ != nullptr, "cannot allocate ", bytes, " bytes");
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (device_.is_cuda()) {
    gpu::release(device_, data_);
  } else {
    std::free(data_);
  }
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : device_(o.device_), bytes_(o.bytes_), data_(o.data_) {
  o.data_ = nullptr;
  o.bytes_ = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    DeviceBuffer gone(std::move(*this));
    device_ = o.device_;
    bytes_ = o.bytes_;
    data_ = o.data_;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::upload(const void* host, size_t bytes, size_t offset) {
  TQKV_CHECK(offset <= bytes_ && bytes <= bytes_ - offset, "DeviceBuffer::upload: ", bytes,
             " bytes at offset ", offset, " do not fit a buffer of ", bytes_);
  if (device_.is_cuda()) {
    gpu::upload(device_, static_cast<uint8_t*>(data_) + offset, host, bytes, nullptr);
    synchronize(device_, nullptr);
  } else if (bytes > 0) {
    std::memcpy(static_cast<uint8_t*>(data_) + offset, host, bytes);
  }
}

void DeviceBuffer::download(void* host, size_t bytes, size_t offset) const {
  TQKV_CHECK(offset <= bytes_ && bytes <= bytes_ - offset, "DeviceBuffer::download: ", bytes,
             " bytes at offset ", offset, " do not fit a buffer of ", bytes_);
  if (device_.is_cuda()) {
    gpu::download(device_, host, static_cast<const uint8_t*>(data_) + offset, bytes, nullptr);
  } else if (bytes > 0) {
    std::memcpy(host, static_cast<const uint8_t*>(data_) + offset, bytes);
  }
}

void DeviceBuffer::fill(uint8_t value) {
  if (device_.is_cuda()) {
    gpu::fill(device_, data_, value, bytes_, nullptr);
    synchronize(device_, nullptr);
  } else if (bytes_ > 0) {
    std::memset(data_, value, bytes_);
  }
}

}  // namespace tqkv
