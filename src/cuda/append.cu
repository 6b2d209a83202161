// Quantize + append: one launch encodes the keys and values of every KV head of `tokens` new
// tokens of one layer and writes them into their page slots. One warp per vector.
//
// The codes must be bit-identical to Codec::encode on the CPU, so every step that decides a code
// follows the CPU's arithmetic exactly (this file is compiled without fused multiply-add):
//   norms and dot products in the canonical order of reduce.hpp (32 lane partials, then a
//   halving tree, reproduced by xor shuffles); Hadamard butterflies stage by stage in the fixed
//   order of rotation.hpp; y · (gain / n) with one division; idx = #{boundaries < y}.
#include <cuda_fp16.h>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"

namespace tqkv::gpu {

namespace {

constexpr int kWarps = 4;

__device__ float load_element(const void* x, int type, size_t i) {
  if (type == 0) return static_cast<const float*>(x)[i];
  const uint16_t bits = static_cast<const uint16_t*>(x)[i];
  if (type == 1) return __half2float(__ushort_as_half(bits));
  return __uint_as_float(uint32_t(bits) << 16);
}

// Σ a[j] b[j] in the canonical order: lane l sums j ≡ l (mod 32) in increasing j, then a halving
// tree, which xor shuffles reproduce (addition is commutative). Every lane gets the result.
__device__ float canonical_dot(const float* a, const float* b, int n, int lane) {
  float part = 0.0f;
  for (int j = lane; j < n; j += 32) part = __fadd_rn(part, __fmul_rn(a[j], b[j]));
  for (int w = 16; w >= 1; w /= 2) part = __fadd_rn(part, __shfl_xor_sync(0xffffffffu, part, w));
  return part;
}

__device__ bool finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

__device__ void store_scalar(uint8_t* p, float v, int f16) {
  if (f16) {
    *reinterpret_cast<uint16_t*>(p) = __half_as_ushort(__float2half_rn(v));
  } else {
    *reinterpret_cast<float*>(p) = v;
  }
}

// Encodes one group's channels (x, already gathered) into its sections at `slot` of `block`.
// Returns false if the vector cannot be encoded (then what it wrote is never made visible).
__device__ bool encode_group(const GroupTables& g, int norm_f16, float* x, float* y,
                             uint8_t* idx, uint8_t* block, uint32_t slot, int lane) {
  const int d = g.dim;
  bool ok = true;
  for (int j = lane; j < d; j += 32) ok &= finite(x[j]);
  ok = __all_sync(0xffffffffu, ok);
  const float n = __fsqrt_rn(canonical_dot(x, x, d, lane));
  ok &= finite(n);
  if (norm_f16) ok &= finite(__half2float(__float2half_rn(n)));
  // y = Π_unscaled x
  if (!g.dense) {
    for (int j = lane; j < d; j += 32) y[j] = __fmul_rn(x[j], g.signs[j]);
    for (int h = 1; h < d; h *= 2) {
      __syncwarp();
      for (int p = lane; p < d / 2; p += 32) {
        const int i = (p / h) * 2 * h + (p % h);
        const float a = y[i], b = y[i + h];
        y[i] = __fadd_rn(a, b);
        y[i + h] = __fsub_rn(a, b);
      }
    }
    __syncwarp();
  } else {
    for (int r = 0; r < d; ++r) {
      const float v = canonical_dot(g.rotation + size_t(r) * d, x, d, lane);
      if (lane == 0) y[r] = v;
    }
    __syncwarp();
  }
  const float inv = n > 0.0f ? __fdiv_rn(g.gain, n) : 0.0f;
  for (int j = lane; j < d; j += 32) y[j] = __fmul_rn(y[j], inv);
  __syncwarp();
  // Codes: the number of boundaries below y (a binary search over the ascending boundaries).
  if (g.mse_bits > 0) {
    for (int j = lane; j < d; j += 32) {
      int c = 0;
      for (int step = 1 << (g.mse_bits - 1); step > 0; step >>= 1)
        if (g.boundaries[c + step - 1] < y[j]) c += step;
      idx[j] = uint8_t(c);
    }
    __syncwarp();
    // Pack field by field (bitpack.hpp): field k of width w holds code bits [shift, shift + w).
    uint8_t* codes = block + g.codes_at + size_t(slot) * g.codes_bytes;
    int shift = 0;
    size_t at = 0;
    for (int w = 8; w >= 1; w /= 2) {
      if (!(g.mse_bits & w)) continue;
      const int per_byte = 8 / w;
      const uint32_t mask = (1u << w) - 1u;
      const int bytes = d * w / 8;
      for (int q = lane; q < bytes; q += 32) {
        uint32_t byte = 0;
        for (int c = 0; c < per_byte; ++c)
          byte |= ((uint32_t(idx[q * per_byte + c]) >> shift) & mask) << (c * w);
        codes[at + q] = uint8_t(byte);
      }
      shift += w;
      at += size_t(bytes);
    }
  }
  if (g.qjl) {
    // Residual in the rotated frame, its norm γ and the signs of S r.
    for (int j = lane; j < d; j += 32)
      x[j] = g.mse_bits > 0 ? __fsub_rn(y[j], g.centroids[idx[j]]) : y[j];
    __syncwarp();
    const float gamma = n > 0.0f ? __fsqrt_rn(canonical_dot(x, x, d, lane)) : 0.0f;
    uint8_t* signs = block + g.signs_at + size_t(slot) * g.signs_bytes;
    for (int i0 = 0; i0 < d; i0 += 8) {
      uint32_t byte = 0;
      for (int i = i0; i < i0 + 8; ++i)
        if (canonical_dot(g.qjl_matrix + size_t(i) * d, x, d, lane) >= 0.0f) byte |= 1u << (i - i0);
      if (lane == 0) signs[i0 / 8] = uint8_t(byte);
    }
    if (lane == 0) store_scalar(block + g.gamma_at + size_t(slot) * (norm_f16 ? 2 : 4), gamma,
                                norm_f16);
  }
  if (lane == 0) store_scalar(block + g.norm_at + size_t(slot) * (norm_f16 ? 2 : 4), n, norm_f16);
  __syncwarp();
  return ok;
}

__global__ void __launch_bounds__(kWarps * 32) append_kernel(const AppendParams p) {
  extern __shared__ float shared[];
  const CacheView& c = p.cache;
  const int d = c.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* x = shared + size_t(warp) * (2 * d + d / 4);
  float* y = x + d;
  uint8_t* idx = reinterpret_cast<uint8_t*>(y + d);
  const uint32_t vectors = 2u * uint32_t(c.kv_heads) * p.tokens;
  const uint32_t v = blockIdx.x * kWarps + uint32_t(warp);
  if (v >= vectors) return;
  // Vector order = the CPU's order of checks: side, then head, then token.
  const uint32_t t = v % p.tokens;
  const int head = int((v / p.tokens) % uint32_t(c.kv_heads));
  const int side = int(v / (p.tokens * uint32_t(c.kv_heads)));
  const CodecTables& codec = side ? c.value : c.key;
  const int16_t* channels =
      c.channels + ((size_t(c.layer) * c.kv_heads + head) * 2 + side) * size_t(d);
  const size_t row = (size_t(t) * c.kv_heads + head) * size_t(d);
  const uint64_t pos = p.first_token + t;
  const uint32_t* pages = c.page_tables + size_t(p.slot) * c.page_table_stride;
  uint8_t* block = block_of(c, pages, pos, head, side);
  const uint32_t slot = uint32_t(pos % uint64_t(c.page_tokens));
  bool ok = true;
  int first = 0;
  for (int gi = 0; gi < codec.groups; ++gi) {
    const GroupTables& g = codec.g[gi];
    for (int j = lane; j < g.dim; j += 32)
      x[j] = load_element(side ? p.v : p.k, p.type, row + size_t(channels[first + j]));
    __syncwarp();
    ok &= encode_group(g, codec.norm_f16, x, y, idx, block, slot, lane);
    first += g.dim;
  }
  if (!ok && lane == 0) atomicMin(p.first_invalid, v);
}

}  // namespace

void launch_append(Device device, const AppendParams& p, CudaStream stream) {
  DeviceGuard guard(device);
  const int d = p.cache.head_dim;
  const size_t smem = size_t(kWarps) * (size_t(2 * d) * 4 + size_t(d));
  if (smem > 48 * 1024)
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(append_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const uint32_t vectors = 2u * uint32_t(p.cache.kv_heads) * p.tokens;
  const uint32_t blocks = (vectors + kWarps - 1) / kWarps;
  append_kernel<<<blocks, kWarps * 32, smem, stream>>>(p);
  TQKV_CUDA_CHECK_LAUNCH("append_kernel");
}

}  // namespace tqkv::gpu
