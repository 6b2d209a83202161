// What the CUDA backend offers the rest of the library (implemented in src/cuda/*.cu, or by
// src/cuda/no_device.cpp, which throws, in a build without CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "cuda/params.hpp"
#include "tqkv/device.hpp"

namespace tqkv::gpu {

void* allocate(Device device, size_t bytes);
void release(Device device, void* p) noexcept;
/// Page-locked host memory: a copy from the device into it is one DMA, without the staging copy
/// (and wait) that ordinary memory takes.
void* allocate_host(size_t bytes);
void release_host(void* p) noexcept;
/// Host → device from ordinary (pageable) memory: the host buffer may be reused on return.
void upload(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
/// Device → host; waits for the stream.
void download(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
void copy(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
/// A CUDA event (created without timing): recorded after what a stream has queued so far, then
/// waited for. destroy_event waits for it first.
void* create_event(Device device);
void destroy_event(void* event) noexcept;
void record_event(Device device, void* event, CudaStream stream);
void wait_event(void* event);
void fill(Device device, void* p, uint8_t value, size_t bytes, CudaStream stream);
int multiprocessors(Device device);

/// Captures `work` (which queues work on the stream it is given) once as a CUDA graph, then
/// times replays with events: the median over `repeats` of the mean of `inner` back-to-back
/// replays, in microseconds. Capture fails if `work` synchronizes: a check of graph safety.
double time_graph_us(Device device, const std::function<void(CudaStream)>& work, int repeats,
                     int inner);
/// The same with `work` queued directly, `inner` times a repeat, not captured: for work whose
/// graph node runs differently (a large device-to-device copy captured in a graph can run at
/// ~2/3 of the rate it runs at from a stream).
double time_stream_us(Device device, const std::function<void(CudaStream)>& work, int repeats,
                      int inner);

/// Copies `height` rows of `width` bytes from src (rows `src_pitch` apart) to dst (rows
/// `dst_pitch` apart), device to device.
void copy_2d(Device device, void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
             size_t width, size_t height, CudaStream stream);

/// The collective of one process driving several GPUs, one rank per device (arrays of one entry
/// per rank: the CUDA files are C++17, without std::span).
class Collective {
 public:
  virtual ~Collective() = default;
  /// recv[r] = send[0] ‖ send[1] ‖ … ‖ send[world − 1] (`count` floats each) on every rank r,
  /// queued on streams[r].
  virtual void all_gather(const float* const* send, float* const* recv, size_t count,
                          const CudaStream* streams) = 0;
};
/// NCCL communicators for the `world` distinct GPUs `devices`, created from one unique id.
std::unique_ptr<Collective> make_nccl_collective(const Device* devices, int world);

void launch_append(Device device, const AppendParams& params, CudaStream stream);
/// One block per (pair, 128 channels) of CalibrationParams' `pairs` jobs.
void launch_calibration(Device device, const CalibrationParams& params, int pairs,
                        CudaStream stream);
void launch_attention(Device device, const AttentionParams& params, CudaStream stream);
/// out[r] = the merge of states[s][r] over s = 0..count−1 (attend_partial's layout).
void launch_merge_states(Device device, const float* states, int count, size_t rows, int head_dim,
                         float* out, CudaStream stream);

}  // namespace tqkv::gpu
