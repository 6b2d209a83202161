// Which compute backends this build of tqkv has. The CUDA backend is optional: a build without
// it answers every GPU request with a clear tqkv::Error instead of failing at link or run time.
#pragma once

#include <string>
#include <vector>

namespace tqkv {

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

}  // namespace tqkv
