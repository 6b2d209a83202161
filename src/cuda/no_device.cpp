#include "tqkv/device.hpp"
#include "tqkv/error.hpp"

namespace tqkv {

bool cuda_backend_built() { return false; }

std::vector<GpuInfo> list_gpus() {
  throw Error("no GPU backend built: this tqkv was configured without CUDA "
              "(reconfigure with -DTQKV_CUDA=ON and nvcc available)");
}

}  // namespace tqkv
