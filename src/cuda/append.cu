// Quantize + append: one launch encodes the keys and values of every KV head of `tokens` new
// tokens of one layer and writes them into their page slots. Two kernels:
//   append_kernel (decode-size appends, and codecs of dense rotations, QJL signs or groups
//   wider than 128): a warp encodes one vector at a time, for several tokens of one (side, KV
//   head); what its lanes need of the codec (channel numbers, signs, offsets) is loaded once for
//   them, and a block's warps share the codec's boundaries, copied into shared memory once.
//   append_pair_kernel (appends of 16 tokens and more of the other codecs): a pair of lanes
//   encodes a whole vector, in registers (below).
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
  const void* src = side ? p.v : p.k;
  // Token i of the warp: its row of the input, its sequence's page-table row and its position,
  // its block and slot in the cache.
  auto token = [&](int i) { return t0 + uint32_t(i) * kWarps; };
  auto row_of = [&](int i) { return (size_t(token(i)) * c.kv_heads + head) * size_t(d); };
  auto pages_for = [&](int i) {
    return c.page_tables + size_t(p.step ? p.step_slot[token(i)] : p.slot) * c.page_table_stride;
  };
  auto position = [&](int i) {
    return p.step ? uint64_t(p.step_position[token(i)]) : p.first_token + token(i);
  };
  auto block_for = [&](int i) { return block_of(c, pages_for(i), position(i), head, side); };
  auto slot_for = [&](int i) { return page_slot(c, position(i)); };
  if (p.step && head == 0 && side == 0 && lane == 0)
    for (int i = 0; i < count; ++i)
      p.lengths[size_t(p.step_slot[token(i)]) * c.layers + c.layer] = uint32_t(position(i)) + 1;
  else if (!p.step && blockIdx.x == 0 && head == 0 && side == 0 && threadIdx.x == 0)
    p.lengths[size_t(p.slot) * c.layers + c.layer] = uint32_t(p.first_token + p.tokens);
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
  const uint32_t v0 = (uint32_t(side) * uint32_t(c.kv_heads) + uint32_t(head)) *
                         (p.step ? p.step_total : p.tokens) + p.step_base;
  if (failed != 0 && lane == 0) atomicMin(p.first_invalid, v0 + token(__ffs(failed) - 1));
}

// ---------------------------------------------------------------------------------------------
// Long appends: a lane pair encodes a whole vector. Lane (t, h) = (lane % 16, lane / 16) holds
// coordinates j = 16m + 8h + i (i < 8) of token t's group as its local u = 8m + i, so that:
//   every Hadamard stage but one pairs registers of one lane (stages 2^s, s < 3: local u and
//   u + 2^s; s > 3: u and u + 2^(s-1)), and stage 8 pairs the two lanes by one xor shuffle a
//   coordinate;
//   the norm's canonical partial sums l (coordinates l + 32k, added in increasing k) are the
//   lane's own for l ≡ 8h + i (mod 16), the first level of its halving tree (l and l + 16) pairs
//   two of them, and the second (l and l + 8) is the one step across the pair;
//   a lane's 8 coordinates 16m + 8h + i are contiguous in the input row and fill one 4-bit code
//   word; of a 2- or 1-bit word each lane holds half, swapped with the other lane to store.
// A warp takes batches of 16 tokens of one (side, KV head) in turn: cp.async copies a batch's
// rows of input into the warp's stage in shared memory, lane (t, h) reads its half of token t's
// row from there once, and the next batch's copies are issued as soon as every lane has read its
// row, so they are in flight while this batch is rotated, coded and stored.

constexpr int kPairTokens = 16;  // tokens a warp encodes at once, one a lane pair
constexpr int kPairBlocks = 4;   // blocks an SM (≤ 128 registers a thread)

// Coordinate (less the lane's 8h) of a pair lane's local coordinate u.
__host__ __device__ constexpr int pair_coordinate(int u) { return 16 * (u / 8) + u % 8; }

// Word 2q + h of a code field of which each lane of a pair holds its parts of words 2q and 2q + 1
// in its word `own`: `select` picks their bytes from `own` (0–3) and the other lane's (4–7).
__device__ __forceinline__ uint32_t pair_word(uint32_t own, uint32_t select) {
  return __byte_perm(own, __shfl_xor_sync(0xffffffffu, own, 16), select);
}

// Where a pair-path group's code search looks: (boundaries[below], below) for each bucket, so a
// code is one load and one comparison. A block holds kBucketCopies interleaved copies of each
// group's table (entry b of copy k at b · kBucketCopies + k), and pair lane l reads copy l % 16:
// a warp's 8-byte loads are served a half-warp at a time, so its lanes' lookups never share a
// bank, wherever the coordinates fall.
struct BucketEntry {
  float boundary;
  uint32_t below;
};
constexpr int kBucketCopies = 16;

// Stores N words at dst (4-byte aligned: fields and records are multiples of 4 bytes, as
// D = 32 · E), as 16-byte stores where dst allows.
template <int N>
__device__ __forceinline__ void store_words(const uint32_t (&word)[N], uint8_t* dst) {
  if (N % 4 == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
#pragma unroll
    for (int m = 0; m + 3 < N; m += 4)
      *reinterpret_cast<uint4*>(dst + 4 * m) =
          make_uint4(word[m], word[m + 1], word[m + 2], word[m + 3]);
  } else {
#pragma unroll
    for (int m = 0; m < N; ++m) *reinterpret_cast<uint32_t*>(dst + 4 * m) = word[m];
  }
}

// The code field of width W (bits [shift, shift + W) of every code) of a D-coordinate vector
// whose codes are bytes four a word, stored as D · W / 32 little-endian words (bitpack.hpp:
// coordinate j at bit j · W of the field).
template <int D, int W>
__device__ __forceinline__ void store_field(const uint32_t (&code)[D / 4], int shift,
                                            uint8_t* dst) {
  constexpr uint32_t kMask = (1u << W) - 1u;
  uint32_t word[D * W / 32];
#pragma unroll
  for (int m = 0; m < D * W / 32; ++m) word[m] = 0;
#pragma unroll
  for (int j = 0; j < D; ++j)
    word[j * W / 32] |= ((code[j / 4] >> (8 * (j % 4) + shift)) & kMask) << (j * W % 32);
  store_words(word, dst);
}

// y = x · inv and its code through the bucket table (GroupTables::buckets): the count of
// boundaries below y. floor(y · scale + offset) converts to unsigned with saturation, so
// negative buckets (and NaN) come out 0 and only the top needs a clamp.
__device__ __forceinline__ BucketEntry bucket_of(float x, float inv, const GroupTables& g,
                                                 const BucketEntry* table, float& y) {
  y = __fmul_rn(x, inv);
  const uint32_t b = __float2uint_rd(__fmaf_rn(y, g.bucket_scale, g.bucket_offset));
  return table[min(b, uint32_t(kBuckets - 1)) * kBucketCopies];
}
// below + (boundary < y), the comparison read off the sign bit of boundary − y: negative exactly
// where boundary < y, as the boundaries are stored with +0 for 0 (+0 − (±0) = +0; a NaN y, of a
// vector that is refused anyway, gives either).
__device__ __forceinline__ uint32_t count_below(const BucketEntry& e, float y) {
  return e.below + (__float_as_uint(__fsub_rn(e.boundary, y)) >> 31);
}
__device__ __forceinline__ uint32_t bucket_code(float x, float inv, const GroupTables& g,
                                                const BucketEntry* table, float& y) {
  const BucketEntry e = bucket_of(x, inv, g, table, y);
  return count_below(e, y);
}

// The codes of B = 2, 3 or 4 bits of a pair lane's L = D / 2 coordinates through the bucket
// table, packed into their fields as they are found (fields widest first: 3 bits are a 2-bit and
// a 1-bit field), then stored at dst where `store`. A lane's 4-bit word m (local u in
// [8m, 8m + 8)) is the field's word 2m + h. Its 2-bit word q (u in [16q, 16q + 16)) holds lane
// h's halves of words 2q (bits 0–15) and 2q + 1 (bits 16–31), whose low halves are lane 0's; its
// 1-bit word q (u in [32q, 32q + 32)) holds lane h's bytes of words 2q (bytes 0, 1) and 2q + 1
// (bytes 2, 3), whose bytes 0 and 2 are lane 0's. Lane h stores words 2q + h of those.
template <int E, int B>
__device__ __forceinline__ void store_pair_codes(const float (&x)[16 * E], float inv,
                                                 const GroupTables& g, const BucketEntry* table,
                                                 int h, bool store, uint8_t* dst) {
  constexpr int L = 16 * E, kWide = B == 3 ? 2 : B;  // the first field's width
  uint32_t wide[L * kWide / 32], low[B == 3 ? (L + 31) / 32 : 1];
#pragma unroll
  for (int u = 0; u < L; ++u) {
    float y;
    const uint32_t at = uint32_t(u * kWide % 32);
    uint32_t& w = wide[u * kWide / 32];
    const uint32_t c = bucket_code(x[u], inv, g, table, y);
    if (B != 3) {
      w = (at ? w : 0u) + (c << at);
    } else {
      w = at ? w | (c & 3u) << at : c & 3u;
      low[u / 32] = u % 32 ? low[u / 32] | (c >> 2) << (u % 32) : c >> 2;
    }
  }
  if (B == 4) {
#pragma unroll
    for (int m = 0; m < L / 8; ++m)
      if (store) *reinterpret_cast<uint32_t*>(dst + 4 * (2 * m + h)) = wide[m];
  } else {
    const uint32_t halves = h ? 0x3276u : 0x5410u;
#pragma unroll
    for (int q = 0; q < L / 16; ++q) {
      const uint32_t word = pair_word(wide[q], halves);
      if (store) *reinterpret_cast<uint32_t*>(dst + 4 * (2 * q + h)) = word;
    }
  }
  if (B == 3) {
    uint8_t* bits = dst + 2 * (32 * E) / 8;
    const uint32_t bytes = h ? 0x3726u : 0x5140u;
#pragma unroll
    for (int q = 0; q < (L + 31) / 32; ++q) {
      const uint32_t word = pair_word(low[q], bytes);
      if (store && (E > 1 || h == 0)) *reinterpret_cast<uint32_t*>(bits + 4 * (2 * q + h)) = word;
    }
  }
}

// One step of the canonical halving tree: part[l] += part[l + W] for l < W.
template <int W, int N>
__device__ __forceinline__ void reduce_half(float (&part)[N]) {
#pragma unroll
  for (int l = 0; l < W; ++l) part[l] = __fadd_rn(part[l], part[l + W]);
}

// A pair lane's L 16-bit elements from `row` (at its half), 16 bytes a load, with their sign
// bits flipped by `flip` (one word a coordinate pair: bits 15 and 31, at the lane's half), each
// converted by `convert` (the element in the low half of its argument). Flipping the sign of a
// float16 or bfloat16 flips that of the float it converts to, exactly.
template <int L, typename Convert>
__device__ __forceinline__ void read_halves(const uint8_t* row, const uint32_t* flip,
                                            float (&x)[L], Convert convert) {
#pragma unroll
  for (int u = 0; u < L; u += 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(row + 2 * pair_coordinate(u));
    const uint4 f = *reinterpret_cast<const uint4*>(flip + pair_coordinate(u) / 2);
    const uint32_t w[4] = {v.x ^ f.x, v.y ^ f.y, v.z ^ f.z, v.w ^ f.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[u + 2 * i] = convert(w[i] & 0xffffu);
      x[u + 2 * i + 1] = convert(w[i] >> 16);
    }
  }
}

// What a pair lane reads of its token's row for one group: its L = D / 2 elements of the staged
// input row `row` (element type `type`, ScalarType), the group's channels from `ch` (or, where
// the group's channels are contiguous, ch = nullptr and `row` at the lane's first channel),
// multiplied by the signs s of the Hadamard rotation (`sign`, or as sign bits `flip` for 16-bit
// elements read in order), then centered where `center` by s · offset (`shift`):
// s·x − s·o = s·(x − o) exactly, the CPU's order. `ch`, `shift`, `sign` and `flip` start at the
// lane's half.
template <int L>
__device__ __forceinline__ void read_pair_group(const uint8_t* row, int type, const int16_t* ch,
                                                const float* shift, const float* sign,
                                                const uint32_t* flip, bool center,
                                                float (&x)[L]) {
  if (ch == nullptr && type == 1) {
    read_halves<L>(row, flip, x,
                   [](uint32_t h) { return __half2float(__ushort_as_half(uint16_t(h))); });
  } else if (ch == nullptr && type == 2) {
    read_halves<L>(row, flip, x, [](uint32_t h) { return __uint_as_float(h << 16); });
  } else {
    if (ch != nullptr) {
#pragma unroll
      for (int u = 0; u < L; ++u) {
        const int c = ch[pair_coordinate(u)];
        x[u] = type == 0 ? reinterpret_cast<const float*>(row)[c]
                         : load_element(row, type, size_t(c));
      }
    } else {
#pragma unroll
      for (int u = 0; u < L; u += 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + 4 * pair_coordinate(u));
        x[u] = v.x;
        x[u + 1] = v.y;
        x[u + 2] = v.z;
        x[u + 3] = v.w;
      }
    }
    // (Four coordinates' signs or shifts a 16-byte load: both are 16-byte aligned, u a
    // multiple of 4.)
#pragma unroll
    for (int u = 0; u < L; u += 4) {
      const float4 q = *reinterpret_cast<const float4*>(sign + pair_coordinate(u));
      x[u] = __fmul_rn(x[u], q.x), x[u + 1] = __fmul_rn(x[u + 1], q.y);
      x[u + 2] = __fmul_rn(x[u + 2], q.z), x[u + 3] = __fmul_rn(x[u + 3], q.w);
    }
  }
  // The runtime `center` is tested outside the loop, which would otherwise issue its
  // subtractions predicated off.
  if (center) {
#pragma unroll
    for (int u = 0; u < L; u += 4) {
      const float4 q = *reinterpret_cast<const float4*>(shift + pair_coordinate(u));
      x[u] = __fsub_rn(x[u], q.x), x[u + 1] = __fsub_rn(x[u + 1], q.y);
      x[u + 2] = __fsub_rn(x[u + 2], q.z), x[u + 3] = __fsub_rn(x[u + 3], q.w);
    }
  }
}

// Encodes one pair-path group of D = 32 · E channels of one token, lane h's half read from its
// staged row (read_pair_group's arguments, at the lane's half); `read` is called once the row
// has been read. Both lanes of every pair must call it (it shuffles); writes only where `store`.
// The same arithmetic, in the same order, as encode_group_in_registers. The signs in `sign` are
// negated for lane 1's coordinates, so that through stages 1, 2 and 4 of the butterflies lane 1
// holds exactly the negated values (a sum and a difference of negated values are the negated sum
// and difference; the norm squares them), and stage 8 becomes one fused multiply-add by ±1
// (exact) a coordinate for both lanes: lane 0 computes a − (−b) = a + b, lane 1 a + (−b) = a − b.
template <int E, typename Read>
__device__ bool encode_pair_vector(const GroupTables& g, const uint8_t* row, int type,
                                   const int16_t* ch, const float* shift, const float* sign,
                                   const uint32_t* flip, bool center, const BucketEntry* table,
                                   const float* boundaries, int norm_f16, uint8_t* block,
                                   uint32_t slot, int h, bool store,
                                   Read read) {
  constexpr int D = 32 * E, L = D / 2;
  float x[L];
  read_pair_group<L>(row, type, ch, shift, sign, flip, center, x);
  read();
  // The norm: the lane's partial sums l = 16a + 8h + i as part[8a + i] (coordinate l + 32k
  // added in increasing k), then the canonical tree, whose second level adds the pair's.
  float part[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    part[i] = __fmul_rn(x[i], x[i]);
#pragma unroll
    for (int k = 1; k < E; ++k)
      part[i] = __fadd_rn(part[i], __fmul_rn(x[16 * k + i], x[16 * k + i]));
  }
  reduce_half<8>(part);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    part[i] = __fadd_rn(part[i], __shfl_xor_sync(0xffffffffu, part[i], 16));
  reduce_half<4>(part);
  reduce_half<2>(part);
  reduce_half<1>(part);
  const float n = __fsqrt_rn(part[0]);
  // A non-finite element makes the norm non-finite, so this is also the elements' check.
  bool ok = finite(n);
  if (norm_f16) ok &= finite(__half2float(__float2half_rn(n)));
  constexpr int kStages = E == 1 ? 5 : E == 2 ? 6 : 7;  // log2(D)
  const float across = h ? 1.0f : -1.0f;
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    if (s == 3) {
#pragma unroll
      for (int u = 0; u < L; ++u)
        x[u] = __fmaf_rn(__shfl_xor_sync(0xffffffffu, x[u], 16), across, x[u]);
      continue;
    }
    const int m = s < 3 ? 1 << s : 1 << (s - 1);
#pragma unroll
    for (int u = 0; u < L; ++u)
      if (!(u & m)) {
        const float a = x[u], b = x[u + m];
        x[u] = __fadd_rn(a, b);
        x[u + m] = __fsub_rn(a, b);
      }
  }
  const float inv = n > 0.0f ? __fdiv_rn(g.gain, n) : 0.0f;
  uint8_t* codes = block + g.codes_at + size_t(slot) * g.codes_bytes;
  if (table != nullptr && g.mse_bits >= 2 && g.mse_bits <= 4) {
    if (g.mse_bits == 4) store_pair_codes<E, 4>(x, inv, g, table, h, store, codes);
    else if (g.mse_bits == 3) store_pair_codes<E, 3>(x, inv, g, table, h, store, codes);
    else store_pair_codes<E, 2>(x, inv, g, table, h, store, codes);
  } else {
    // Other widths: codes as bytes, four a word (local u in byte u % 4 of word u / 4), found by
    // the bucket table or the binary search (four coordinates at a time, so that the codes and
    // what is left of the rotated row fit in registers together); lane 0 then gathers the
    // vector's words (word 4m + q, q < 2, is its own 2m + q; 4m + 2 + q lane 1's) and packs and
    // stores them field by field.
    uint32_t code[L / 4];
#pragma unroll
    for (int u0 = 0; u0 < L; u0 += 4) {
      float y[4];
      uint32_t c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (table != nullptr) {
          c[i] = bucket_code(x[u0 + i], inv, g, table, y[i]);
        } else {
          y[i] = __fmul_rn(x[u0 + i], inv);
          c[i] = 0;
        }
      }
      if (table == nullptr)
        for (int step = 1 << (g.mse_bits - 1); step > 0; step >>= 1)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (boundaries[c[i] + step - 1] < y[i]) c[i] += step;
      code[u0 / 4] = c[0] | c[1] << 8 | c[2] << 16 | c[3] << 24;
    }
    uint32_t all[D / 4];
#pragma unroll
    for (int m = 0; m < L / 4; ++m) {
      all[4 * (m / 2) + m % 2] = code[m];
      all[4 * (m / 2) + 2 + m % 2] = __shfl_xor_sync(0xffffffffu, code[m], 16);
    }
    if (store && h == 0) {
      int shift = 0;
      if (g.mse_bits & 8) store_field<D, 8>(all, shift, codes), codes += D, shift += 8;
      if (g.mse_bits & 4) store_field<D, 4>(all, shift, codes), codes += D / 2, shift += 4;
      if (g.mse_bits & 2) store_field<D, 2>(all, shift, codes), codes += D / 4, shift += 2;
      if (g.mse_bits & 1) store_field<D, 1>(all, shift, codes);
    }
  }
  if (store && h == 0)
    store_scalar(block + g.norm_at + size_t(slot) * (norm_f16 ? 2 : 4), ok ? n : 0.0f, norm_f16);
  return ok;
}

// Grid: (X, KV head, side); warp w of block x takes the batches of 16 tokens x · kWarps + w,
// then X · kWarps further on, and so on. Every group of the codec takes the pair path
// (register_width 1, 2 or 4), the widest with 32 · kMaxE channels; the inputs are 16-byte
// aligned.
template <int kMaxE>
__global__ void __launch_bounds__(kWarps * 32, kPairBlocks)
    append_pair_kernel(const AppendParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const CacheView& c = p.cache;
  const int d = c.head_dim;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int token_lane = lane % kPairTokens, h = lane / kPairTokens;
  const int head = int(blockIdx.y), side = int(blockIdx.z);
  const CodecTables& codec = side ? c.value : c.key;
  const size_t index = (size_t(c.layer) * c.kv_heads + head) * 2 + size_t(side);
  const int16_t* channels = c.channels + index * size_t(d);
  const float* offsets = codec.center ? c.offsets + index * size_t(d) : nullptr;
  // Shared: the groups' bucket tables [group][kBuckets][kBucketCopies] and boundaries
  // [group][256]; for each coordinate of the concatenated groups its sign s, s · its offset and
  // its channel, and for each coordinate pair the sign bits; then each warp's stage of 16 rows.
  const uint32_t row_bytes = uint32_t(d) * (p.type == 0 ? 4u : 2u);
  const uint32_t row_stride = row_bytes + 16;  // 16-byte reads of 8 lanes hit distinct banks
  BucketEntry* tables = reinterpret_cast<BucketEntry*>(smem);
  float* boundaries = reinterpret_cast<float*>(tables + kMaxGroups * kBuckets * kBucketCopies);
  float* shift = boundaries + kMaxGroups * 256;
  float* sign = shift + d;
  uint32_t* flip = reinterpret_cast<uint32_t*>(sign + d);
  int16_t* ch = reinterpret_cast<int16_t*>(flip + d / 2);
  uint8_t* stage = reinterpret_cast<uint8_t*>(ch) + ((2 * d + 15) & ~15) +
                   size_t(warp) * kPairTokens * row_stride;
  const uint32_t batches = (p.tokens + kPairTokens - 1) / kPairTokens;
  const uint32_t stride = gridDim.x * kWarps;
  uint32_t batch = blockIdx.x * kWarps + uint32_t(warp);
  const void* src = side ? p.v : p.k;
  const uint32_t pieces = row_bytes / 16;  // 16-byte pieces a row
  const uint32_t first_row = uint32_t(lane) / pieces, first_piece = uint32_t(lane) % pieces;
  const uint32_t rows_step = 32 / pieces, pieces_step = 32 % pieces;
  // Batch b's rows into the stage: row r is token 16b + r's [head] row of the input.
  const size_t token_bytes = size_t(c.kv_heads) * row_bytes;  // the input's stride a token
  auto copy_batch = [&](uint32_t b) {
    if (b < batches) {
      const uint32_t t0 = b * kPairTokens, rows = min(uint32_t(kPairTokens), p.tokens - t0);
      if (pieces_step == 0) {
        // A row's pieces divide 32 (rows of 16 · 2^k bytes): the lane copies piece first_piece
        // of rows first_row, first_row + rows_step, ..., one pointer step each.
        const uint8_t* from = static_cast<const uint8_t*>(src) +
                              size_t(t0 + first_row) * token_bytes + size_t(head) * row_bytes +
                              16 * first_piece;
        uint8_t* to = stage + first_row * row_stride + 16 * first_piece;
#pragma unroll 4
        for (uint32_t r = first_row; r < rows; r += rows_step) {
          cp_async(to, from, 16);
          from += rows_step * token_bytes;
          to += rows_step * row_stride;
        }
      } else {
        // Piece i = lane + 32k of the batch is piece i % pieces of row i / pieces, stepped
        // without divisions.
        uint32_t r = first_row, o = first_piece;
        for (uint32_t i = uint32_t(lane); i < rows * pieces; i += 32) {
          cp_async(stage + r * row_stride + 16 * o,
                   static_cast<const uint8_t*>(src) + size_t(t0 + r) * token_bytes +
                       size_t(head) * row_bytes + 16 * o,
                   16);
          r += rows_step;
          o += pieces_step;
          if (o >= pieces) o -= pieces, ++r;
        }
      }
    }
    cp_async_commit();
  };
  copy_batch(batch);  // in flight while the tables are filled
  int first = 0;
  for (int gi = 0; gi < codec.groups; ++gi) {
    const GroupTables& g = codec.g[gi];
    const int n = (1 << g.mse_bits) - 1;
    for (int i = int(threadIdx.x); i < n; i += kWarps * 32)
      boundaries[256 * gi + i] = g.boundaries[i];
    if (g.buckets != nullptr)
      for (int i = int(threadIdx.x); i < kBuckets * kBucketCopies; i += kWarps * 32) {
        const uint32_t below = g.buckets[i / kBucketCopies];
        tables[kBuckets * kBucketCopies * gi + i] = {__fadd_rn(g.boundaries[below], 0.0f),
                                                     below};
      }
    // Lane 1's coordinates (bit 3 of j set) take negated signs (encode_pair_vector).
    auto sign_of = [&](int j) { return j & 8 ? -g.signs[j] : g.signs[j]; };
    for (int j = int(threadIdx.x); j < g.dim; j += kWarps * 32) {
      const int source = channels[first + j];
      ch[first + j] = int16_t(source);
      sign[first + j] = sign_of(j);
      shift[first + j] = offsets != nullptr ? sign_of(j) * offsets[source] : 0.0f;
      if (j % 2 == 0)
        flip[(first + j) / 2] =
            (sign_of(j) < 0.0f ? 0x8000u : 0u) | (sign_of(j + 1) < 0.0f ? 0x80000000u : 0u);
    }
    first += g.dim;
  }
  __syncthreads();
  // Groups whose channels are contiguous read their rows with constant offsets.
  uint32_t contiguous = 0;  // bit gi
  first = 0;
  for (int gi = 0; gi < codec.groups; ++gi) {
    bool in_order = true;
    for (int j = lane; j < codec.g[gi].dim; j += 32) in_order &= ch[first + j] == ch[first] + j;
    if (__all_sync(0xffffffffu, in_order) && (ch[first] * (p.type == 0 ? 4 : 2)) % 16 == 0)
      contiguous |= 1u << gi;
    first += codec.g[gi].dim;
  }
  const uint32_t* pages = c.page_tables + size_t(p.slot) * c.page_table_stride;
  const int element = p.type == 0 ? 4 : 2;
  if (blockIdx.x == 0 && head == 0 && side == 0 && threadIdx.x == 0)
    p.lengths[size_t(p.slot) * c.layers + c.layer] = uint32_t(p.first_token + p.tokens);
  uint32_t failed = 0xffffffffu;
  for (; batch < batches; batch += stride) {
    const uint32_t t = batch * kPairTokens + uint32_t(token_lane);
    const bool mine = t < p.tokens;
    uint8_t* block = mine ? block_of(c, pages, p.first_token + t, head, side) : nullptr;
    const uint32_t slot = page_slot(c, p.first_token + t);
    const uint8_t* row = stage + token_lane * row_stride;
    cp_async_wait<0>();
    __syncwarp();
    bool ok = true;
    first = 0;
    for (int gi = 0; gi < codec.groups; ++gi) {
      const GroupTables& g = codec.g[gi];
      const bool in_order = contiguous >> gi & 1u;
      const int half = first + 8 * h;  // the lane's first coordinate of the group
      // After the last group's read of the rows, the next batch's copies go out.
      auto read = [&] {
        if (gi + 1 < codec.groups) return;
        __syncwarp();
        copy_batch(batch + stride);
      };
      auto run = [&](auto e) {
        constexpr int E = decltype(e)::value;
        ok &= encode_pair_vector<E>(
            g, in_order ? row + size_t(ch[half]) * element : row, p.type,
            in_order ? nullptr : ch + half, shift + half, sign + half, flip + half / 2,
            codec.center != 0,
            g.buckets != nullptr ? tables + kBuckets * kBucketCopies * gi + token_lane : nullptr,
            boundaries + 256 * gi,
            codec.norm_f16, block, slot, h, mine, read);
      };
      // Hadamard sizes are powers of two, at most 32 · kMaxE (launch_append picks kMaxE).
      switch (g.dim / 32) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, kMaxE >= 2 ? 2 : 1>{}); break;
        default: run(std::integral_constant<int, kMaxE>{}); break;
      }
      first += g.dim;
    }
    if (!ok && mine) failed = min(failed, t);
  }
  cp_async_wait<0>();  // no copy may outlive the warp
  // Vector order = the CPU's order of checks: side, then head, then token.
  if (failed != 0xffffffffu)
    atomicMin(p.first_invalid,
              (uint32_t(side) * uint32_t(c.kv_heads) + uint32_t(head)) * p.tokens + failed);
}

}  // namespace

void launch_append(Device device, const AppendParams& p, CudaStream stream) {
  DeviceGuard guard(device);
  TQKV_CHECK(p.cache.kv_heads <= 65535, "GPU append: at most 65535 KV heads, got ",
             p.cache.kv_heads);
  const int d = p.cache.head_dim;
  // The pair path takes appends of a warp's tokens or more whose groups are all register-path
  // groups of at most 128 channels, from 16-byte aligned inputs; shorter ones, decode steps of
  // several sequences and the rest take a warp a vector.
  int widest = 1;
  bool pairs = !p.step && p.tokens >= uint32_t(kPairTokens) &&
               (reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v)) % 16 == 0;
  for (const CodecTables* t : {&p.cache.key, &p.cache.value})
    for (int gi = 0; gi < t->groups; ++gi) {
      const int w = register_width(t->g[gi]);
      widest = std::max(widest, w);
      pairs &= w >= 1 && w <= 4;
    }
  const dim3 heads_sides(1, unsigned(p.cache.kv_heads), 2);
  auto launch = [&](auto kernel, size_t smem, unsigned blocks) {
    if (smem > 48 * 1024)
      TQKV_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    if (blocks == 0) {  // the pair path: one wave of blocks, its warps taking batches in turn
      int per_sm = 0;
      TQKV_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem));
      const unsigned wave = unsigned(std::max(1, per_sm) * multiprocessors(device));
      const unsigned batches = (p.tokens + kPairTokens - 1) / kPairTokens;
      blocks = std::max(1u, std::min((batches + kWarps - 1) / kWarps,
                                     wave / (heads_sides.y * heads_sides.z)));
    }
    kernel<<<dim3(blocks, heads_sides.y, heads_sides.z), kWarps * 32, smem, stream>>>(p);
    TQKV_CUDA_CHECK_LAUNCH("append_kernel");
  };
  if (pairs) {
    const size_t row_bytes = size_t(d) * (p.type == 0 ? 4 : 2);
    const size_t smem = kMaxGroups * kBuckets * kBucketCopies * 8 + kMaxGroups * 256 * 4 +
                        size_t(d) * 10 +
                        ((2 * size_t(d) + 15) & ~size_t(15)) +
                        size_t(kWarps) * kPairTokens * (row_bytes + 16);
    if (widest == 1) launch(append_pair_kernel<1>, smem, 0);
    else if (widest == 2) launch(append_pair_kernel<2>, smem, 0);
    else launch(append_pair_kernel<4>, smem, 0);
    return;
  }
  const size_t smem = size_t(kWarps) * (size_t(2 * d) * 4 + size_t(d)) + kMaxGroups * 255 * 4 +
                      kMaxGroups * kBuckets;
  const unsigned blocks = (p.tokens + kWarps * kTokens - 1) / (kWarps * kTokens);
  if (widest == 1) launch(append_kernel<1>, smem, blocks);
  else if (widest == 2) launch(append_kernel<2>, smem, blocks);
  else if (widest == 4) launch(append_kernel<4>, smem, blocks);
  else launch(append_kernel<8>, smem, blocks);
}

}  // namespace tqkv::gpu
