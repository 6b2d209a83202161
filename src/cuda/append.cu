// Quantize + append: one launch encodes the keys and values of every KV head of `tokens` new
// tokens of one layer and writes them into their page slots. A warp encodes one vector at a
// time, for several tokens of one (side, KV head): what its lanes need of the codec (channel
// numbers, signs, offsets) is loaded once for them, and a block's warps share the codec's
// boundaries, copied into shared memory once.
//
// The codes must be bit-identical to Codec::encode on the CPU, so every step that decides a code
// follows the CPU's arithmetic exactly (this file is compiled without fused multiply-add):
//   norms and dot products in the canonical order of reduce.hpp (32 lane partials, then a
//   halving tree, reproduced by xor shuffles); Hadamard butterflies stage by stage in the fixed
//   order of rotation.hpp; y · (gain / n) with one division; idx = #{boundaries < y}.
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"

namespace tqkv::gpu {

namespace {

constexpr int kWarps = 4;
constexpr int kTokens = 8;  // tokens a warp encodes

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

// The Hadamard butterflies of rotation.hpp (unscaled), in their order and with their operations,
// on d = 32·E values in registers: lane l holds elements l + 32k, so the stages h < 32 pair
// lanes (xor shuffles) and the stages h = 32m pair registers k and k + m.
template <int E>
__device__ __forceinline__ void butterflies(float (&r)[E], int lane) {
#pragma unroll
  for (int h = 1; h < 32; h *= 2) {
    // The lane holding element i + h of its pairs computes other − r = other + (−r), the other
    // r + other = other + r: the same IEEE operations, as one addition after a sign flip.
    const uint32_t flip = lane & h ? 0x80000000u : 0u;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const float other = __shfl_xor_sync(0xffffffffu, r[k], h);
      r[k] = __fadd_rn(other, __uint_as_float(__float_as_uint(r[k]) ^ flip));
    }
  }
#pragma unroll
  for (int m = 1; m < E; m *= 2)
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (!(k & m)) {
        const float a = r[k], b = r[k + m];
        r[k] = __fadd_rn(a, b);
        r[k + m] = __fsub_rn(a, b);
      }
}

// y = H diag(signs) x (unscaled) for d = 32·E, x and y in shared memory.
template <int E>
__device__ void hadamard_in_registers(const GroupTables& g, const float* x, float* y, int lane) {
  float r[E];
#pragma unroll
  for (int k = 0; k < E; ++k) r[k] = __fmul_rn(x[lane + 32 * k], g.signs[lane + 32 * k]);
  butterflies<E>(r, lane);
#pragma unroll
  for (int k = 0; k < E; ++k) y[lane + 32 * k] = r[k];
  __syncwarp();
}

// Encodes one group's channels (x, already gathered) into its sections at `slot` of `block`.
// Returns false if the vector cannot be encoded (then what it wrote is never made visible).
__device__ bool encode_group(const GroupTables& g, const float* boundaries, int norm_f16,
                             float* x, float* y, uint8_t* idx, uint8_t* block, uint32_t slot,
                             int lane) {
  const int d = g.dim;
  bool ok = true;
  for (int j = lane; j < d; j += 32) ok &= finite(x[j]);
  ok = __all_sync(0xffffffffu, ok);
  const float n = __fsqrt_rn(canonical_dot(x, x, d, lane));
  ok &= finite(n);
  if (norm_f16) ok &= finite(__half2float(__float2half_rn(n)));
  // y = Π_unscaled x
  if (!g.dense) {
    switch (d) {  // Hadamard sizes are powers of two
      case 32: hadamard_in_registers<1>(g, x, y, lane); break;
      case 64: hadamard_in_registers<2>(g, x, y, lane); break;
      case 128: hadamard_in_registers<4>(g, x, y, lane); break;
      case 256: hadamard_in_registers<8>(g, x, y, lane); break;
      default:
        for (int j = lane; j < d; j += 32) y[j] = __fmul_rn(x[j], g.signs[j]);
        for (int h = 1; h < d; h *= 2) {
          __syncwarp();
          for (int p = lane; p < d / 2; p += 32) {
            const int i = ((p & ~(h - 1)) << 1) | (p & (h - 1));  // (p / h) · 2h + p mod h
            const float a = y[i], b = y[i + h];
            y[i] = __fadd_rn(a, b);
            y[i + h] = __fsub_rn(a, b);
          }
        }
        __syncwarp();
    }
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
        if (boundaries[c + step - 1] < y[j]) c += step;
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
    const bool gamma_ok = __all_sync(0xffffffffu, ok) && finite(gamma) &&
                          (!norm_f16 || finite(__half2float(__float2half_rn(gamma))));
    if (lane == 0) store_scalar(block + g.gamma_at + size_t(slot) * (norm_f16 ? 2 : 4),
                                gamma_ok ? gamma : 0.0f, norm_f16);
  }
  // A refused vector's slot stays past the sequence's end, where attention still reads whole
  // tiles (masked): its norm must be finite, so it gets 0.
  if (lane == 0)
    store_scalar(block + g.norm_at + size_t(slot) * (norm_f16 ? 2 : 4), ok ? n : 0.0f, norm_f16);
  __syncwarp();
  return ok;
}

// What a lane needs of a Hadamard-rotated MSE group (no QJL) of d = 32·E channels for every
// vector it encodes, loaded once for a warp's tokens: its channel numbers channels[lane + 32k],
// their Hadamard signs and (centering codecs) their offsets.
template <int E>
struct GroupLanes {
  int ch[E];
  float sign[E];
  float offset[E];
};

template <int E>
__device__ __forceinline__ GroupLanes<E> group_lanes(const GroupTables& g, const int16_t* channels,
                                                     const float* offsets, int lane) {
  GroupLanes<E> r;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    r.ch[k] = channels[lane + 32 * k];
    r.sign[k] = g.signs[lane + 32 * k];
  }
#pragma unroll
  for (int k = 0; k < E; ++k) r.offset[k] = offsets != nullptr ? offsets[r.ch[k]] : 0.0f;
  return r;
}

// x[k] = channel ch[k] of the row (all loads in flight at once; the element type is the
// launch's, so it is switched on outside the loops, which keeps them free of branches). A
// centering codec then subtracts the channel's offset, as the CPU does.
template <int E>
__device__ __forceinline__ void load_channels(const void* src, int type, size_t row,
                                              const GroupLanes<E>& lanes, bool center,
                                              float (&x)[E]) {
  if (type == 0) {
    const float* s = static_cast<const float*>(src) + row;
#pragma unroll
    for (int k = 0; k < E; ++k) x[k] = s[lanes.ch[k]];
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + row;
    uint32_t bits[E];
#pragma unroll
    for (int k = 0; k < E; ++k) bits[k] = s[lanes.ch[k]];
#pragma unroll
    for (int k = 0; k < E; ++k)
      x[k] = type == 1 ? __half2float(__ushort_as_half(uint16_t(bits[k])))
                       : __uint_as_float(bits[k] << 16);
  }
  if (center)
#pragma unroll
    for (int k = 0; k < E; ++k) x[k] = __fsub_rn(x[k], lanes.offset[k]);
}

// The common case in registers: a Hadamard-rotated MSE group (no QJL) of d = 32·E channels,
// x loaded straight from the input (load_channels). Lane l holds channels l + 32k, which is
// also the canonical order's lane assignment, so the norm's partial sums need no reordering.
// Same arithmetic, in the same order, as encode_group.
template <int E>
__device__ bool encode_group_in_registers(const GroupTables& g, const GroupLanes<E>& lanes,
                                          const float* boundaries, const uint8_t* buckets,
                                          int norm_f16, float (&x)[E], uint8_t* block,
                                          uint32_t slot, int lane) {
  bool ok = true;
#pragma unroll
  for (int k = 0; k < E; ++k) ok &= finite(x[k]);
  ok = __all_sync(0xffffffffu, ok);
  float part = 0.0f;
#pragma unroll
  for (int k = 0; k < E; ++k) part = __fadd_rn(part, __fmul_rn(x[k], x[k]));
  for (int w = 16; w >= 1; w /= 2) part = __fadd_rn(part, __shfl_xor_sync(0xffffffffu, part, w));
  const float n = __fsqrt_rn(part);
  ok &= finite(n);
  if (norm_f16) ok &= finite(__half2float(__float2half_rn(n)));
  // y = H diag(signs) x
#pragma unroll
  for (int k = 0; k < E; ++k) x[k] = __fmul_rn(x[k], lanes.sign[k]);
  butterflies<E>(x, lane);
  const float inv = n > 0.0f ? __fdiv_rn(g.gain, n) : 0.0f;
  uint32_t code[E];
#pragma unroll
  for (int k = 0; k < E; ++k) {
    x[k] = __fmul_rn(x[k], inv);
    code[k] = 0;
  }
  if (buckets != nullptr) {
    // y's bucket gives the count of boundaries below it, or one fewer (code_buckets).
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const int b = __float2int_rd(__fmaf_rn(x[k], g.bucket_scale, g.bucket_offset));
      const uint32_t below = buckets[min(max(b, 0), kBuckets - 1)];
      code[k] = below + (boundaries[below] < x[k] ? 1u : 0u);
    }
  } else {
    for (int step = 1 << (g.mse_bits - 1); step > 0; step >>= 1)
#pragma unroll
      for (int k = 0; k < E; ++k)
        if (boundaries[code[k] + step - 1] < x[k]) code[k] += step;
  }
  // Pack (bitpack.hpp): field of width w, widest first, holds code bits [shift, shift + w);
  // coordinates 8q..8q+7 fill its w bytes from q·w, coordinate 8q + i at bit i·w. Eight lanes
  // OR their bits together and one of them stores the w bytes.
  uint8_t* codes = block + g.codes_at + size_t(slot) * g.codes_bytes;
  int shift = 0;
  uint32_t at = 0;
  for (int w = 8; w >= 1; w /= 2) {
    if (!(g.mse_bits & w)) continue;
    const uint32_t mask = (1u << w) - 1u;
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const uint32_t j = uint32_t(lane + 32 * k), bits = (code[k] >> shift) & mask;
      if (w == 8) {
        codes[at + j] = uint8_t(bits);
        continue;
      }
      uint32_t v = bits << (uint32_t(w) * (j % 8));
      v |= __shfl_xor_sync(0xffffffffu, v, 1);
      v |= __shfl_xor_sync(0xffffffffu, v, 2);
      v |= __shfl_xor_sync(0xffffffffu, v, 4);
      if (j % 8 == 0) {
        uint8_t* dst = codes + at + (j / 8) * uint32_t(w);  // aligned to w (d = 32·E)
        if (w == 4) *reinterpret_cast<uint32_t*>(dst) = v;
        else if (w == 2) *reinterpret_cast<uint16_t*>(dst) = uint16_t(v);
        else *dst = uint8_t(v);
      }
    }
    shift += w;
    at += uint32_t(g.dim * w / 8);
  }
  if (lane == 0)
    store_scalar(block + g.norm_at + size_t(slot) * (norm_f16 ? 2 : 4), ok ? n : 0.0f, norm_f16);
  return ok;
}

// A group's channels / 32 where it takes the register path (a Hadamard-rotated MSE group of
// 32 · E channels, E = 1, 2, 4 or 8, no QJL), else 0.
__host__ __device__ inline int register_width(const GroupTables& g) {
  return !g.dense && !g.qjl && g.mse_bits > 0 && g.dim % 32 == 0 && g.dim <= 256 ? g.dim / 32 : 0;
}

// Grid: (token blocks, KV head, side). Warp w of block x encodes tokens x · kWarps · kTokens +
// i · kWarps + w (i < kTokens), so its lanes load what they need of a group once for all of them.
// kMaxE: the widest register-path group's channels / 32 (1, 2, 4 or 8), so that a codec of
// narrow groups gets a kernel with their registers only.
template <int kMaxE>
__global__ void __launch_bounds__(kWarps * 32) append_kernel(const AppendParams p) {
  extern __shared__ float shared[];
  const CacheView& c = p.cache;
  const int d = c.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = int(blockIdx.y), side = int(blockIdx.z);
  const CodecTables& codec = side ? c.value : c.key;
  // The groups' boundaries, [group][255] after the warps' buffers, then their buckets
  // [group][kBuckets].
  float* boundaries = shared + size_t(kWarps) * (2 * d + d / 4);
  uint8_t* buckets = reinterpret_cast<uint8_t*>(boundaries + kMaxGroups * 255);
  for (int gi = 0; gi < codec.groups; ++gi) {
    const GroupTables& g = codec.g[gi];
    const int n = g.mse_bits > 0 ? (1 << g.mse_bits) - 1 : 0;
    for (int i = int(threadIdx.x); i < n; i += kWarps * 32)
      boundaries[255 * gi + i] = g.boundaries[i];
    if (g.buckets != nullptr && threadIdx.x < kBuckets)
      buckets[kBuckets * gi + threadIdx.x] = g.buckets[threadIdx.x];
  }
  __syncthreads();
  float* x = shared + size_t(warp) * (2 * d + d / 4);
  float* y = x + d;
  uint8_t* idx = reinterpret_cast<uint8_t*>(y + d);
  const uint32_t t0 = blockIdx.x * kWarps * kTokens + uint32_t(warp);
  if (t0 >= p.tokens) return;
  const int count = int(min(uint32_t(kTokens), (p.tokens - t0 + kWarps - 1) / kWarps));
  const size_t index = (size_t(c.layer) * c.kv_heads + head) * 2 + size_t(side);
  const int16_t* channels = c.channels + index * size_t(d);
  const float* offsets = codec.center ? c.offsets + index * size_t(d) : nullptr;
  const uint32_t* pages = c.page_tables + size_t(p.slot) * c.page_table_stride;
  const void* src = side ? p.v : p.k;
  // Token i of the warp: its row of the input, its block and slot in the cache.
  auto token = [&](int i) { return t0 + uint32_t(i) * kWarps; };
  auto row_of = [&](int i) { return (size_t(token(i)) * c.kv_heads + head) * size_t(d); };
  auto block_for = [&](int i) { return block_of(c, pages, p.first_token + token(i), head, side); };
  auto slot_for = [&](int i) { return page_slot(c, p.first_token + token(i)); };
  uint32_t failed = 0;  // bit i: token i cannot be encoded
  int first = 0;
  for (int gi = 0; gi < codec.groups; ++gi) {
    const GroupTables& g = codec.g[gi];
    if (register_width(g) > 0) {
      auto run = [&](auto e) {
        constexpr int E = decltype(e)::value;
        const GroupLanes<E> lanes = group_lanes<E>(g, channels + first, offsets, lane);
        const uint8_t* group_buckets = g.buckets != nullptr ? buckets + kBuckets * gi : nullptr;
        // Token i + 1's elements are loaded while token i is encoded.
        uint32_t refused = 0;
        float next[E];
        load_channels<E>(src, p.type, row_of(0), lanes, offsets != nullptr, next);
#pragma unroll 1
        for (int i = 0; i < count; ++i) {
          float x[E];
#pragma unroll
          for (int k = 0; k < E; ++k) x[k] = next[k];
          if (i + 1 < count)
            load_channels<E>(src, p.type, row_of(i + 1), lanes, offsets != nullptr, next);
          if (!encode_group_in_registers<E>(g, lanes, boundaries + 255 * gi, group_buckets,
                                            codec.norm_f16, x, block_for(i), slot_for(i), lane))
            refused |= 1u << i;
        }
        return refused;
      };
      // Hadamard sizes are powers of two, at most 32 · kMaxE: launch_append picks kMaxE as the
      // widest group of either side, so the cases a kernel maps down never run in it (mapping
      // them to a trap instead costs the 128-channel kernel spills).
      switch (g.dim / 32) {
        case 1: failed |= run(std::integral_constant<int, 1>{}); break;
        case 2: failed |= run(std::integral_constant<int, kMaxE >= 2 ? 2 : 1>{}); break;
        case 4: failed |= run(std::integral_constant<int, kMaxE >= 4 ? 4 : 1>{}); break;
        default: failed |= run(std::integral_constant<int, kMaxE>{}); break;
      }
      first += g.dim;
      continue;
    }
    for (int i = 0; i < count; ++i) {
      for (int j = lane; j < g.dim; j += 32) {
        const int ch = channels[first + j];
        x[j] = load_element(src, p.type, row_of(i) + size_t(ch));
        if (offsets != nullptr) x[j] = __fsub_rn(x[j], offsets[ch]);
      }
      __syncwarp();
      if (!encode_group(g, boundaries + 255 * gi, codec.norm_f16, x, y, idx, block_for(i),
                        slot_for(i), lane))
        failed |= 1u << i;
    }
    first += g.dim;
  }
  // Vector order = the CPU's order of checks: side, then head, then token.
  const uint32_t v0 = (uint32_t(side) * uint32_t(c.kv_heads) + uint32_t(head)) * p.tokens;
  if (failed != 0 && lane == 0) atomicMin(p.first_invalid, v0 + token(__ffs(failed) - 1));
}

}  // namespace

void launch_append(Device device, const AppendParams& p, CudaStream stream) {
  DeviceGuard guard(device);
  const int d = p.cache.head_dim;
  const size_t smem = size_t(kWarps) * (size_t(2 * d) * 4 + size_t(d)) + kMaxGroups * 255 * 4 +
                      kMaxGroups * kBuckets;
  int widest = 1;
  for (const CodecTables* t : {&p.cache.key, &p.cache.value})
    for (int gi = 0; gi < t->groups; ++gi) widest = std::max(widest, register_width(t->g[gi]));
  auto kernel = widest == 1   ? append_kernel<1>
                : widest == 2 ? append_kernel<2>
                : widest == 4 ? append_kernel<4>
                              : append_kernel<8>;
  if (smem > 48 * 1024)
    TQKV_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  TQKV_CHECK(p.cache.kv_heads <= 65535, "GPU append: at most 65535 KV heads, got ",
             p.cache.kv_heads);
  const dim3 grid((p.tokens + kWarps * kTokens - 1) / (kWarps * kTokens),
                  unsigned(p.cache.kv_heads), 2);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  TQKV_CUDA_CHECK_LAUNCH("append_kernel");
}

}  // namespace tqkv::gpu
