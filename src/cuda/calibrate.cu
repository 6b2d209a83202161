// The channel statistics that a codec calibrating on its first batch chooses from, computed on
// the device where a GPU cache's batch lives (CalibrationParams), with the CPU's arithmetic
// (Codec::calibrated_spec): a block per (side, KV head) pair and 128 of its channels, a thread
// per channel. A channel's sums run over the tokens in order, as the CPU's do, so they are not
// split across threads; instead the rows reach shared memory through a ring of cp.async stages
// that keeps the loads ahead of the threads' chains of double additions.
#include <cstdint>
#include <type_traits>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"

namespace tqkv::gpu {

namespace {

constexpr int kThreads = 128;            // channels a block
constexpr uint32_t kStageBytes = 16384;  // a stage: 64 float16 (32 float32) rows of 128 channels
constexpr int kStages = 8;               // 7 in flight while one is read
constexpr uint32_t kBatch = 16;          // a thread's elements loaded before they are added

// kType: the input's ScalarType (p.type), a constant so that a stage's loads are issued together
// ahead of the additions (with the type read at run time each element waited for its load).
template <int kType>
__global__ void __launch_bounds__(kThreads) calibration_kernel(const CalibrationParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int pair = int(blockIdx.x), j = int(threadIdx.x);
  const int side = p.jobs[3 * pair], head = p.jobs[3 * pair + 1], flags = p.jobs[3 * pair + 2];
  const int d = p.head_dim, first = int(blockIdx.y) * kThreads;  // the block's first channel
  const int width = min(kThreads, d - first);
  const uint32_t width_u = uint32_t(width);
  constexpr uint32_t elem = kType == 0 ? 4 : 2;
  const uint32_t row_bytes = uint32_t(width) * elem;  // a multiple of 16: head_dim % 8 == 0
  const uint32_t rows = kStageBytes / (kThreads * elem);  // tokens a stage
  const uint32_t stages = (p.tokens + rows - 1) / rows;
  const size_t token_bytes = size_t(p.kv_heads) * size_t(d) * elem;  // the input's stride
  const uint8_t* src = static_cast<const uint8_t*>(side ? p.v : p.k) +
                       (size_t(head) * size_t(d) + size_t(first)) * elem;
  const bool aligned = (reinterpret_cast<uintptr_t>(src) & 15) == 0;
  // Piece i = j + 128k of a stage (16 bytes) is piece i % pieces of row i / pieces, stepped
  // without divisions.
  const uint32_t pieces = row_bytes / 16;
  const uint32_t first_row = uint32_t(j) / pieces, first_piece = uint32_t(j) % pieces;
  const uint32_t rows_step = kThreads / pieces, pieces_step = kThreads % pieces;
  // Stage s's rows (row_bytes each, packed) into ring slot s % kStages.
  auto fill = [&](uint32_t s) {
    if (s < stages) {
      uint8_t* to = smem + (s % kStages) * kStageBytes;
      const uint32_t t0 = s * rows, n = min(rows, p.tokens - t0);
      const uint8_t* from = src + size_t(t0) * token_bytes;
      if (aligned) {
        uint32_t r = first_row, o = first_piece;
        for (uint32_t i = uint32_t(j); i < n * pieces; i += kThreads) {
          cp_async(to + r * row_bytes + 16 * o, from + size_t(r) * token_bytes + 16 * o, 16);
          r += rows_step;
          o += pieces_step;
          if (o >= pieces) o -= pieces, ++r;
        }
      } else if (j < width) {  // an input not 16-byte aligned: element by element
        for (uint32_t r = 0; r < n; ++r, from += token_bytes) {
          if (elem == 4)
            reinterpret_cast<float*>(to)[r * width_u + uint32_t(j)] =
                reinterpret_cast<const float*>(from)[j];
          else
            reinterpret_cast<uint16_t*>(to)[r * width_u + uint32_t(j)] =
                reinterpret_cast<const uint16_t*>(from)[j];
        }
      }
    }
    cp_async_commit();
  };
  // Adds the thread's channel of every token, in order, to acc: x itself, or (energy) the
  // square of x − μ (where centered). Each batch of tokens is converted (and squared) first,
  // branch-free, so that only the chain of additions is serial; each channel's first
  // non-finite token goes to bad.
  uint32_t bad = 0xffffffffu;
  auto over_tokens = [&](bool energy, bool centered, float mu) {
    double acc = 0.0;
    auto add = [&](const uint8_t* stage, uint32_t r0, uint32_t t, auto count) {
      constexpr uint32_t kN = decltype(count)::value;
      double v[kN];
      uint32_t b = 0xffffffffu;
#pragma unroll
      for (uint32_t u = 0; u < kN; ++u) {
        const float x = load_element(stage, kType, (r0 + u) * width_u + uint32_t(j));
        b = min(b, isfinite(x) ? 0xffffffffu : t + u);
        const float c = centered ? __fsub_rn(x, mu) : x;
        v[u] = energy ? __dmul_rn(double(c), double(c)) : double(x);
      }
#pragma unroll
      for (uint32_t u = 0; u < kN; ++u) acc = __dadd_rn(acc, v[u]);
      bad = min(bad, b);
    };
    for (int s = 0; s < kStages - 1; ++s) fill(uint32_t(s));
    for (uint32_t s = 0; s < stages; ++s) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage s is in, and every thread is done with slot (s − 1) % kStages
      fill(s + kStages - 1);
      const uint8_t* stage = smem + (s % kStages) * kStageBytes;
      const uint32_t t0 = s * rows, n = min(rows, p.tokens - t0);
      if (j < width) {
        uint32_t r0 = 0;
        for (; r0 + kBatch <= n; r0 += kBatch)
          add(stage, r0, t0 + r0, std::integral_constant<uint32_t, kBatch>{});
        for (; r0 < n; ++r0) add(stage, r0, t0 + r0, std::integral_constant<uint32_t, 1>{});
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is free for the next pass
    return acc;
  };
  const size_t at = size_t(pair) * size_t(d) + size_t(first + j);
  float mu = 0.0f;
  if ((flags & kCalibrateGivenOffset) && j < width) mu = p.offsets[at];
  if (flags & kCalibrateOffset) {
    mu = __double2float_rn(__ddiv_rn(over_tokens(false, false, 0.0f), double(p.tokens)));
    if (j < width) p.offsets[at] = mu;
  }
  if (flags & kCalibrateEnergies) {
    const double energy =
        over_tokens(true, (flags & (kCalibrateOffset | kCalibrateGivenOffset)) != 0, mu);
    if (j < width) p.energies[at] = energy;
  }
  if (j < width) p.first_bad[at] = bad;
}

}  // namespace

void launch_calibration(Device device, const CalibrationParams& p, int pairs,
                        CudaStream stream) {
  if (pairs <= 0 || p.tokens == 0) return;
  DeviceGuard guard(device);
  const size_t smem = size_t(kStages) * kStageBytes;
  const dim3 grid(unsigned(pairs), unsigned((p.head_dim + kThreads - 1) / kThreads));
  auto run = [&](auto kernel) {
    TQKV_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    TQKV_CUDA_CHECK_LAUNCH("calibration_kernel");
  };
  if (p.type == 0) run(calibration_kernel<0>);
  else if (p.type == 1) run(calibration_kernel<1>);
  else run(calibration_kernel<2>);
}

}  // namespace tqkv::gpu
