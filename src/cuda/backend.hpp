// What the CUDA backend offers the rest of the library (implemented in src/cuda/*.cu, or by
// src/cuda/no_device.cpp, which throws, in a build without CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "cuda/params.hpp"
#include "tqkv/device.hpp"

namespace tqkv::gpu {

void* allocate(Device device, size_t bytes);
void release(Device device, void* p) noexcept;
/// Host → device from ordinary (pageable) memory: the host buffer may be reused on return.
void upload(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
/// Device → host; waits for the stream.
void download(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
void copy(Device device, void* dst, const void* src, size_t bytes, CudaStream stream);
void fill(Device device, void* p, uint8_t value, size_t bytes, CudaStream stream);
int multiprocessors(Device device);

/// Captures `work` (which queues work on the stream it is given) once as a CUDA graph, then
/// times replays with events: the median over `repeats` of the mean of `inner` back-to-back
/// replays, in microseconds. Capture fails if `work` synchronizes: a check of graph safety.
double time_graph_us(Device device, const std::function<void(CudaStream)>& work, int repeats,
                     int inner);

void launch_append(Device device, const AppendParams& params, CudaStream stream);
void launch_attention(Device device, const AttentionParams& params, CudaStream stream);

}  // namespace tqkv::gpu
