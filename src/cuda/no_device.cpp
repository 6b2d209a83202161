// A build without the CUDA backend: every GPU request is an error that says so.
#include "cuda/backend.hpp"
#include "tqkv/device.hpp"
#include "tqkv/error.hpp"

namespace tqkv {

namespace {
[[noreturn]] void no_backend() {
  throw Error("no GPU backend built: this tqkv was configured without CUDA "
              "(reconfigure with -DTQKV_CUDA=ON and nvcc available)");
}
}  // namespace

bool cuda_backend_built() { return false; }
std::vector<GpuInfo> list_gpus() { no_backend(); }
void check_device(Device device) {
  if (device.is_cuda()) no_backend();
}
void synchronize(Device device, CudaStream) {
  if (device.is_cuda()) no_backend();
}

namespace gpu {
void* allocate(Device, size_t) { no_backend(); }
void release(Device, void*) noexcept {}
void* allocate_host(size_t) { no_backend(); }
void release_host(void*) noexcept {}
void upload(Device, void*, const void*, size_t, CudaStream) { no_backend(); }
void download(Device, void*, const void*, size_t, CudaStream) { no_backend(); }
void copy(Device, void*, const void*, size_t, CudaStream) { no_backend(); }
void* create_event(Device) { no_backend(); }
void destroy_event(void*) noexcept {}
void record_event(Device, void*, CudaStream) { no_backend(); }
void wait_event(void*) { no_backend(); }
void fill(Device, void*, uint8_t, size_t, CudaStream) { no_backend(); }
int multiprocessors(Device) { no_backend(); }
double time_graph_us(Device, const std::function<void(CudaStream)>&, int, int) { no_backend(); }
double time_stream_us(Device, const std::function<void(CudaStream)>&, int, int) { no_backend(); }
void copy_2d(Device, void*, size_t, const void*, size_t, size_t, size_t, CudaStream) {
  no_backend();
}
std::unique_ptr<Collective> make_nccl_collective(const Device*, int) { no_backend(); }
void launch_append(Device, const AppendParams&, CudaStream) { no_backend(); }
void launch_calibration(Device, const CalibrationParams&, int, CudaStream) { no_backend(); }
void launch_attention(Device, const AttentionParams&, CudaStream) { no_backend(); }
void launch_merge_states(Device, const float*, int, size_t, int, float*, CudaStream) {
  no_backend();
}
}  // namespace gpu

}  // namespace tqkv
