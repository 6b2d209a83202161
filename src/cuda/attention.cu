// Fused attention on the compressed cache (SPEC §2), decode and prefill, on NVIDIA GPUs (sm_80+).
//
// Work: a warp takes one item = (sequence, KV head, tile of 16 query rows, token split). A query
// row is (query token i, query head r of the KV head's GQA group), so a KV head's codes are read
// once for all R query heads of a token (and for up to 16/R tokens at prefill).
//
// Scores and value sums run on tensor cores (mma.m16n8k16, float16 in, float32 accumulate) fed
// straight from the codes: a 32-bit "nibble word" holds the codes of 8 consecutive coordinates
// (any width 1..4, and QJL sign bits, are first spread to nibbles), and a byte of two nibbles
// indexes a 256-entry table of float16 pairs (c[lo], c[hi]) in shared memory (one copy per lane,
// addressed by a single byte permute of the code word). Because a dot
// product may visit its coordinates in any order, each lane owns whole nibble words:
//   keys   (B = K^T, 16 coords × 8 tokens): lane (i = lane % 4, token lane / 4) owns words
//          [i·Wk, (i+1)·Wk) of a term, and its query fragments use the same coordinates;
//   values (B = V, 16 tokens × 8 coords): lane (tokens 2i, 2i+1, 2i+8, 2i+9; column lane / 4)
//          owns words [n·Wv, (n+1)·Wv); bytes pair the same coordinate of two tokens.
// (The decode kernels built for fixed shapes multiply values transposed, and those for one
// 128-coordinate term per side keys as A as well: the same words, other fragments; see there.
// The one for 2-bit terms of 128 coordinates looks up four codes a byte: quad_entry.)
// A "term" is one group's codes or one group's sign bits; each has its own per-token scale
// (n, or n·γ·√(π/2)/d for QJL) applied to the score or folded into the probabilities.
// A prepare kernel rotates (and projects by S) each unit's query rows once, normalized per row
// to keep float16 in range; scores are kept in log2 units (scale · log2 e folded into the query).
// Codes, norms and γ reach the warp through its ring of stage buffers in shared memory, filled
// by cp.async several tiles ahead. The common codecs (one 128-coordinate MSE term per side of
// width 2, 3 or 4, or the fractional 3.5 / 2.5 bits' two 64-coordinate terms) run kernels built
// for their shape, in blocks of up to 16 warps; the rest read it from the term tables. On sm_90 the attention and merge kernels are launched to start early
// (programmatic dependent launch) and wait only before reading what the kernel ahead wrote.
// Each item leaves (m, l, acc) per row in the workspace; a merge kernel combines the splits and
// applies each value group's inverse rotation once (plus Sᵀ for QJL values).
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/backend.hpp"
#include "cuda/common.cuh"

namespace tqkv::gpu {

namespace {

// Warps of a block, at most: 16 for the kernels built for one 128-coordinate term per side
// (≤ 128 registers: four warps per scheduler share one copy of the code tables), 12 for the
// fractional ones (≤ 168 registers), 4 for the generic ones (up to 255 registers). A GPU with
// less shared memory per block (e.g. 99 KB on sm_86 / sm_89) gets fewer: the launch fits them to
// its limit (and takes 12 where 16 would leave SMs idle), and the kernel reads them from blockDim.
constexpr int kFixedWarps = 12;  // the fractional kernels' blocks (and the others' narrower choice)
__host__ __device__ constexpr int block_warps(int fixed_dim) {
  return fixed_dim == 128 ? 16 : fixed_dim > 0 ? kFixedWarps : 4;
}
constexpr int kStages = 4;  // a warp's stage buffers: tiles in flight while one is computed
// The code-pair tables open the shared memory: entry e of every table lies in row e (256 bytes,
// 64 words), which holds lut_copies interleaved copies of each of the kernel's 2·kTerms tables.
// A lane reads its own copy, so lanes spread over the banks (32 copies: bank = lane, no
// conflicts), and a lookup's address, entry · 256 + the lane's word · 4, is one byte permute
// of the code word (lut in the kernel). Quad lookups' 8-byte entries come in 16 copies (a
// half-warp's lanes, one 8-byte read each, meet no bank twice). The warps' stage buffers follow.
constexpr uint32_t kTableBytes = 256u * 256u;
__host__ __device__ constexpr int lut_copies(int terms) { return 64 / (2 * terms); }
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same with the accumulators as four separate variables.
__device__ __forceinline__ void mma16816(float& c0, float& c1, float& c2, float& c3, uint32_t a0,
                                         uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same for tiles of 8 query rows (decode): rows 8–15 of A are zero, so only C's first two
// registers carry data; the other two are neither kept nor re-zeroed between calls.
__device__ __forceinline__ void mma16816_rows8(float& c0, float& c1, uint32_t a0, uint32_t a2,
                                               uint32_t b0, uint32_t b1) {
  asm("{\n .reg .f32 unused2, unused3;\n"
      " mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,unused2,unused3}, "
      "{%2,%3,%4,%5}, {%6,%7}, {%0,%1,%8,%8};\n}\n"
      : "+f"(c0), "+f"(c1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.0f));
}

// 2^x on the special-function unit alone (ex2.approx.ftz: relative error below 2^-22; results
// below 2^-126 flush to 0, which no probability here needs), where exp2f adds range scaling.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// An 8 × 8 float16 matrix, of which this lane holds row lane / 4, columns 2·(lane % 4) + {0, 1},
// transposed: the lane then holds the same fragment of the transpose.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// The bits of a where m is set and of b where it is clear, in one LOP3: written as
// (a & m) | (b & ~m) the compiler emits two, the mask first.
__device__ __forceinline__ uint32_t bit_select(uint32_t a, uint32_t m, uint32_t b) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xE2;\n" : "=r"(d) : "r"(a), "r"(m), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// 8 two-bit codes (16 bits) → 8 nibbles; 8 one-bit codes → 8 nibbles.
__device__ __forceinline__ uint32_t spread2(uint32_t x) {
  x = (x | (x << 8)) & 0x00ff00ffu;
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  return (x | (x << 2)) & 0x33333333u;
}
__device__ __forceinline__ uint32_t spread1(uint32_t x) {
  x = (x | (x << 12)) & 0x000f000fu;
  x = (x | (x << 6)) & 0x03030303u;
  return (x | (x << 3)) & 0x11111111u;
}

// The nibble word `w` (coordinates 8w..8w+7) of one token's codes of width 1..4 (bitpack.hpp:
// fields widest first, field k holding code bits from its shift, each a whole number of bytes
// per 8 coordinates).
__device__ __forceinline__ uint32_t load_word(const uint8_t* codes, int width, int dim, int w) {
  switch (width) {
    case 4: return *reinterpret_cast<const uint32_t*>(codes + 4 * w);
    case 3:
      return spread2(*reinterpret_cast<const uint16_t*>(codes + 2 * w)) |
             (spread1(codes[dim / 4 + w]) << 2);
    case 2: return spread2(*reinterpret_cast<const uint16_t*>(codes + 2 * w));
    default: return spread1(codes[w]);
  }
}

// Words [first, first + N) of one token's 4-bit codes (already nibble words), N = 1, 2 or 4,
// with one 4-, 8- or 16-byte load instead of N 4-byte loads; word by word where they pass
// `words` (never, with kFits: a shape fixed at compile time).
template <int N, bool kFits>
__device__ __forceinline__ void load_words4(const uint8_t* codes, int first, int words,
                                            uint32_t (&w)[N]) {
  if constexpr (N == 1) {
    if (kFits || first < words) {
      w[0] = *reinterpret_cast<const uint32_t*>(codes + 4 * first);
      return;
    }
  } else if constexpr (N == 4) {
    if (kFits || first + 4 <= words) {
      const uint4 v = *reinterpret_cast<const uint4*>(codes + 4 * first);
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
      return;
    }
  } else if constexpr (N == 2) {
    if (kFits || first + 2 <= words) {
      const uint2 v = *reinterpret_cast<const uint2*>(codes + 4 * first);
      w[0] = v.x; w[1] = v.y;
      return;
    }
  }
  if constexpr (!kFits) {
#pragma unroll
    for (int k = 0; k < N; ++k)
      w[k] = first + k < words ? *reinterpret_cast<const uint32_t*>(codes + 4 * (first + k)) : 0u;
  }
}

// Packed lookups (the kernels built for fixed shapes, terms of width 2 or 3). Rather than spread
// such codes to nibble words (~14 instructions a word at 3 bits), the lookup byte is assembled
// from the code planes in place: bits 0–1 the low plane's bits of the pair's first code, bits 2–3
// of its second, bits 4 and 5 their high-plane bits (width 3; at width 2 bits 4–7 are ignored).
// The code-pair table is filled in that order (packed_entry), and a word's bytes 0..3 hold the
// pairs packed_order names (0, 2, 1, 3: what a 12-bit shift and a byte permute can reach); the
// query fragments and the value accumulators follow the same order.
__host__ __device__ constexpr bool packed_width(int width) { return width == 2 || width == 3; }
__host__ __device__ constexpr int packed_order(int byte) {
  return byte == 1 ? 2 : byte == 2 ? 1 : byte;
}
// The nibble-word entry (first code | second << 4) that packed byte `e` stands for.
__device__ __forceinline__ uint32_t packed_entry(uint32_t e, int width) {
  const uint32_t hi = width == 3 ? 1u : 0u;
  const uint32_t a = (e & 3u) | (((e >> 4) & hi) << 2);
  const uint32_t b = ((e >> 2) & 3u) | (((e >> 5) & hi) << 2);
  return a | (b << 4);
}
// Nibbles 4m + (0, 2, 1, 3) of `x` (m = 0, 1: its low or high 16 bits) in the low nibbles of
// bytes 0..3; the high nibbles carry other bits.
template <int kHalf>
__device__ __forceinline__ uint32_t spread_nibbles(uint32_t x) {
  return kHalf ? __byte_perm(x >> 4, x, 0x3276u) : __byte_perm(x << 12, x, 0x3254u);
}
// 2-bit pieces (0, 2, 1, 3) of the low byte of `x` in bits 4–5 of bytes 0..3, bits 6–7 zero
// (the products' copies meet only in the low nibbles, where their sums stay below the next
// piece).
__device__ __forceinline__ uint32_t spread_crumbs(uint32_t x) {
  return (x & 0x33u) * 0x110u + (x & 0xccu) * 0x440000u;
}
// Quad lookups (the kernel built for 2-bit terms of 128 coordinates a side): a byte of four 2-bit
// codes indexes a table of four float16 (8 bytes), so that one lookup yields two A registers of
// an MMA where a code pair yields one. A key byte is one token's coordinates 4i..4i+3, as
// stored; a value byte holds two tokens' codes of two coordinates (see the kernel's value
// lookups). Entry e: (c[e & 3], c[e >> 2 & 3]) and (c[e >> 4 & 3], c[e >> 6]), read from the
// nibble-word pairs.
__device__ __forceinline__ uint2 quad_entry(const uint32_t* pairs, uint32_t e) {
  return make_uint2(pairs[(e & 3u) | ((e >> 2 & 3u) << 4)], pairs[(e >> 4 & 3u) | ((e >> 6) << 4)]);
}
__device__ __forceinline__ uint32_t merge_planes(uint32_t lo, uint32_t hi) {
  return bit_select(lo, 0x0f0f0f0fu, hi);
}
// Loads kBytes (1, 2, 4 or 8, aligned to their size) bytes as one word or two, little-endian;
// bytes past kBytes read as 0.
template <int kBytes>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t (&w)[2]) {
  static_assert(kBytes == 1 || kBytes == 2 || kBytes == 4 || kBytes == 8, "1, 2, 4 or 8 bytes");
  w[1] = 0u;
  if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (kBytes == 2) {
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  } else {
    w[0] = *p;
  }
}
template <int kBytes>
__device__ __forceinline__ uint32_t load_word_of(const uint8_t* p) {
  static_assert(kBytes <= 4, "a word holds at most 4 bytes");
  uint32_t w[2];
  load_bytes<kBytes>(p, w);
  return w[0];
}

// Key lookup words [first, first + N) of one token's codes of width 2 or 3 (N = 1, 2 or 4):
// byte k of a word pairs coordinates 2·packed_order(k) and 2·packed_order(k) + 1.
template <int N, int kDim>
__device__ __forceinline__ void load_packed_keys(const uint8_t* codes, int width, int first,
                                                 uint32_t (&w)[N]) {
  uint32_t lo[2];
  load_bytes<2 * N>(codes + 2 * first, lo);
  const uint32_t hi = width == 3 ? load_word_of<N>(codes + kDim / 4 + first) : 0u;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const uint32_t l = k % 2 ? spread_nibbles<1>(lo[k / 2]) : spread_nibbles<0>(lo[k / 2]);
    w[k] = width == 3 ? merge_planes(l, spread_crumbs(hi >> (8 * k))) : l;
  }
}

// Value lookup words [first, first + N) (N = 1 or 2) of two tokens' codes of width 2 or 3, by
// parity: byte k of w[m][p] pairs the two tokens' coordinate 2·packed_order(k) + p of word m.
template <int N, int kDim>
__device__ __forceinline__ void load_packed_values(const uint8_t* row0, const uint8_t* row1,
                                                   int width, int first,
                                                   uint32_t (&w)[N][2]) {
  const uint32_t l0 = load_word_of<2 * N>(row0 + 2 * first);
  const uint32_t l1 = load_word_of<2 * N>(row1 + 2 * first);
  // Nibble i: the two tokens' 2-bit low codes of coordinate 2i (even) or 2i + 1 (odd).
  const uint32_t even = bit_select(l0, 0x33333333u, l1 << 2);
  const uint32_t odd = bit_select(l0 >> 2, 0x33333333u, l1);
  uint32_t hi_even = 0u, hi_odd = 0u;
  if (width == 3) {
    const uint32_t h0 = load_word_of<N>(row0 + kDim / 4 + first);
    const uint32_t h1 = load_word_of<N>(row1 + kDim / 4 + first);
    hi_even = bit_select(h0, 0x55555555u, h1 << 1);  // 2-bit piece i: coordinate 2i
    hi_odd = bit_select(h0 >> 1, 0x55555555u, h1);
  }
#pragma unroll
  for (int m = 0; m < N; ++m) {
    const uint32_t le = m ? spread_nibbles<1>(even) : spread_nibbles<0>(even);
    const uint32_t lo = m ? spread_nibbles<1>(odd) : spread_nibbles<0>(odd);
    w[m][0] = width == 3 ? merge_planes(le, spread_crumbs(hi_even >> (8 * m))) : le;
    w[m][1] = width == 3 ? merge_planes(lo, spread_crumbs(hi_odd >> (8 * m))) : lo;
  }
}

// A term's shape: from its tables, or fixed at compile time (kDim > 0: the kernel was built for
// MSE terms of kDim coordinates each, whose widths kWidths lists one decimal digit per term, the
// first term last: 4 is one 4-bit term, 34 a 4-bit then a 3-bit one), so that the hot codecs'
// kernels fold it into constants instead of reading and branching on the tables in the inner
// loops (the term index is a constant there once the loops over terms are unrolled).
struct Shape {
  int width, dim, words, per_lane;
  uint32_t bytes;
  bool sign;
};
__host__ __device__ constexpr int term_width(int widths, int t) {
  return t == 0 ? widths % 10 : widths / 10 % 10;
}
__host__ __device__ constexpr int fixed_terms(int widths) { return widths >= 10 ? 2 : 1; }
template <int kDim, int kWidths, int kLanesPerWord>
__device__ __forceinline__ Shape shape_of(const TermTables& x, int t) {
  if constexpr (kDim > 0) {
    constexpr int words = kDim / 8;
    const int width = term_width(kWidths, t);
    return {width, kDim, words, (words + kLanesPerWord - 1) / kLanesPerWord,
            uint32_t(kDim * width / 8), false};
  } else {
    return {x.width, x.dim, x.words, x.per_lane, x.bytes, x.sign != 0};
  }
}

// Bytes of a stored norm or γ: 2 (float16) or 4; the kernels built for fixed shapes take only
// float16 norms.
template <int kDim>
__device__ __forceinline__ uint32_t norm_bytes(const CodecTables& t) {
  return kDim > 0 || t.norm_f16 ? 2u : 4u;
}
__device__ __forceinline__ float load_scalar(const uint8_t* p, uint32_t bytes) {
  return bytes == 2 ? __half2float(*reinterpret_cast<const __half*>(p))
                    : *reinterpret_cast<const float*>(p);
}

// Scale of a term's contribution for token j of a staged tile: n, or n·γ (· √(π/2)/d for keys).
template <int kDim>
__device__ __forceinline__ float staged_scale(const CodecTables& t, const TermTables& x,
                                              bool sign, const uint8_t* buf, uint32_t j,
                                              bool keys) {
  const uint32_t nb = norm_bytes<kDim>(t);
  float s = load_scalar(buf + x.stage_norm + j * nb, nb);
  if (sign) {
    s *= load_scalar(buf + x.stage_gamma + j * nb, nb);
    if (keys) s *= x.key_factor;
  }
  return s;
}

// Programmatic dependent launch (sm_90+): the attention and merge kernels are launched so that
// they may start while the kernel before them still runs (their table fills, page lookups and
// first code copies overlap it), and wait here before reading what it wrote; a kernel lets the
// next one start early with let_next_start. Without it (sm_80), launches are ordered as usual.
__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// A run of `bytes` (a multiple of 8) by the warp, in 16-byte pieces where the run allows.
__device__ __forceinline__ void copy_run(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                         int lane) {
  const uint32_t piece = bytes % 16 == 0 ? 16u : 8u;
  for (uint32_t o = uint32_t(lane) * piece; o < bytes; o += 32u * piece)
    cp_async(dst + o, src + o, piece);
}

// The page numbers of tile `base`'s two 8-token halves (pages hold a multiple of 8 tokens, so a
// half never straddles two); a half past `last` gets last's page (no branch).
__device__ __forceinline__ void load_pages(const CacheView& c, const uint32_t* pages,
                                           uint32_t base, uint32_t last, uint32_t (&page)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) page[h] = pages[page_index(c, min(base + 8u * uint32_t(h), last))];
}

// Starts copying tile `base` (16 tokens) of every key and value term (codes, norms, γ) of KV
// head `head` into a stage buffer (layout: TermTables::stage_*). A half past the sequence's end
// is copied from the last page's slots: whatever they hold is finite (pools are zeroed when
// allocated, and an append stores only finite codes and norms) and masked. Every section run starts 64-byte
// aligned and a half's run is 8 tokens × its bytes per token, so the pieces are aligned; all
// but the lane's offset is the same for the warp.
template <int kTerms>
__device__ __forceinline__ void stage_tile(const CacheView& c, uint8_t* stage, uint32_t base,
                                           const uint32_t (&page)[2], int head, int lane) {
  const uint32_t head_at = uint32_t(head) * (c.key_block_bytes + c.value_block_bytes);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t slot = page_slot(c, base + 8u * uint32_t(h));
    const uint8_t* key = c.pool + uint64_t(page[h]) * c.layer_page_bytes + head_at;
#pragma unroll
    for (int side = 0; side < 2; ++side) {
      const CodecTables& ct = side ? c.value : c.key;
      const uint8_t* block = key + (side ? c.key_block_bytes : 0u);
      const uint32_t nb = norm_bytes<0>(ct);
#pragma unroll
      for (int i = 0; i < kTerms; ++i) {
        if (i >= ct.n_terms) break;
        const TermTables& x = ct.terms[i];
        const Shape sh = shape_of<0, 0, 1>(x, i);
        const uint32_t half = 8u * uint32_t(h);
        copy_run(stage + x.stage_codes + half * sh.bytes, block + x.at + slot * sh.bytes,
                 8u * sh.bytes, lane);
        copy_run(stage + x.stage_norm + half * nb, block + x.norm_at + slot * nb, 8u * nb, lane);
        if (sh.sign)
          copy_run(stage + x.stage_gamma + half * nb, block + x.gamma_at + slot * nb, 8u * nb,
                   lane);
      }
    }
  }
}

// Term kTerm's codes of one side (widths kWidths) for stage_tile_fixed; nothing where the side
// has fewer terms. A template per (side, term), so that the widths, byte counts and parameter
// offsets are constants (a loop over terms whose count depends on the side stayed a loop).
template <int kDim, int kWidths, int kTerm>
__device__ __forceinline__ void stage_term_codes(const TermTables& x, const uint8_t* side_block,
                                                 uint8_t* stage, uint32_t slot, bool second,
                                                 uint32_t part) {
  if constexpr (kTerm < fixed_terms(kWidths)) {
    constexpr uint32_t bytes = uint32_t(kDim * term_width(kWidths, kTerm) / 8);
    const uint8_t* src = side_block + x.at + slot * bytes;
    uint8_t* dst = stage + x.stage_codes + (second ? 8u * bytes : 0u);
#pragma unroll
    for (uint32_t i = 0; i < (bytes / 2u + 15u) / 16u; ++i) {  // bytes / 2 pieces a half
      const uint32_t o = 16u * (part + 16u * i);
      if (o < 8u * bytes) cp_async(dst + o, src + o, 16);
    }
  }
}

// stage_tile for the kernels built for fixed shapes (MSE terms of kDim coordinates, float16
// norms), without loops or per-piece address arithmetic: lanes 0–15 copy the first half (8
// tokens) and lanes 16–31 the second, so a lane's page and slot are fixed for the tile and its
// 16-byte pieces of each code run lie at constant offsets; a few lanes of each half copy its
// norm runs (one per term: each term is a channel group with its own norms). At 4 bits and one
// term per side the warp issues 2 + 2 + 1 copies a tile.
template <int kDim, int kKeyWidths, int kValueWidths>
__device__ __forceinline__ void stage_tile_fixed(const CacheView& c, uint8_t* stage,
                                                 uint32_t base, const uint32_t (&page)[2],
                                                 int head, int lane) {
  const bool second = lane >= 16;
  const uint32_t part = uint32_t(lane % 16);
  const uint32_t slot = page_slot(c, base + (second ? 8u : 0u));
  const uint8_t* block = c.pool + uint64_t(second ? page[1] : page[0]) * c.layer_page_bytes +
                         uint32_t(head) * (c.key_block_bytes + c.value_block_bytes);
  const uint8_t* values = block + c.key_block_bytes;
  static_assert(kMaxTerms >= 2, "two terms a side");
  stage_term_codes<kDim, kKeyWidths, 0>(c.key.terms[0], block, stage, slot, second, part);
  stage_term_codes<kDim, kKeyWidths, 1>(c.key.terms[1], block, stage, slot, second, part);
  stage_term_codes<kDim, kValueWidths, 0>(c.value.terms[0], values, stage, slot, second, part);
  stage_term_codes<kDim, kValueWidths, 1>(c.value.terms[1], values, stage, slot, second, part);
  // Norm runs (8 float16 each): part 2·t + side copies term t of that side, selected without
  // indexing the parameter tables by a lane-dependent number.
  constexpr int kTermsOf[2] = {fixed_terms(kKeyWidths), fixed_terms(kValueWidths)};
  constexpr int kRuns = 2 * (kTermsOf[0] > kTermsOf[1] ? kTermsOf[0] : kTermsOf[1]);
  if (part < uint32_t(kRuns)) {
    const bool side = part & 1u;
    const int t = int(part >> 1);
    const TermTables& k0 = c.key.terms[0];
    const TermTables& k1 = c.key.terms[kTermsOf[0] - 1];
    const TermTables& v0 = c.value.terms[0];
    const TermTables& v1 = c.value.terms[kTermsOf[1] - 1];
    const bool present = t < (side ? kTermsOf[1] : kTermsOf[0]);
    const uint32_t norm_at = side ? (t ? v1.norm_at : v0.norm_at) : (t ? k1.norm_at : k0.norm_at);
    const uint32_t stage_norm =
        side ? (t ? v1.stage_norm : v0.stage_norm) : (t ? k1.stage_norm : k0.stage_norm);
    if (present)
      cp_async(stage + stage_norm + (second ? 16u : 0u),
               block + (side ? c.key_block_bytes : 0u) + norm_at + slot * 2u, 16);
  }
}

struct ItemGeometry {
  int b = 0, h = 0, tile = 0;
  uint32_t T = 0, L = 0;
  uint32_t lo = 0, hi = 0;  // tokens any row of the tile can see
};

__device__ ItemGeometry item_geometry(const AttentionParams& p, uint32_t unit) {
  ItemGeometry g;
  while (g.b + 1 < p.batch && p.first_unit[g.b + 1] <= unit) ++g.b;
  const uint32_t local = unit - p.first_unit[g.b];
  g.h = int(local % uint32_t(p.cache.kv_heads));
  g.tile = int(local / uint32_t(p.cache.kv_heads));
  g.T = p.cache.lengths[size_t(p.slot[g.b]) * p.cache.layers + p.cache.layer];
  g.L = p.queries[g.b];
  const uint32_t R = uint32_t(p.group);
  const uint32_t i_first = uint32_t(g.tile) * kTileRows / R;
  const uint32_t i_last = min(g.L - 1, (uint32_t(g.tile) * kTileRows + kTileRows - 1) / R);
  const uint32_t end = g.T - p.tail[g.b];  // one past the last query token's position
  const uint32_t pos_first = end - g.L + i_first, pos_last = end - g.L + i_last;
  g.hi = pos_last + 1;
  g.lo = p.window && pos_first + 1 > p.window ? uint32_t(pos_first + 1 - p.window) : 0u;
  return g;
}

// Row ρ of the tile: its query token (or −1 if the tile has no such row).
__device__ __forceinline__ int row_token(const AttentionParams& p, const ItemGeometry& g,
                                         int rho) {
  const uint32_t i = (uint32_t(g.tile) * kTileRows + uint32_t(rho)) / uint32_t(p.group);
  return i < g.L ? int(i) : -1;
}

// y = M x for a row-major d × d matrix, by one warp (x and y distinct).
__device__ void multiply(const float* m, const float* x, float* y, int d, int lane) {
  for (int r = lane; r < d; r += 32) {
    float s = 0.0f;
    for (int j = 0; j < d; ++j) s += m[size_t(r) * d + j] * x[j];
    y[r] = s;
  }
  __syncwarp();
}

// y = Π_g x (the group's forward rotation, gain included), by one warp (x and y distinct).
__device__ void rotate_forward(const GroupTables& g, const float* x, float* y, int lane) {
  if (g.dense) {
    multiply(g.rotation, x, y, g.dim, lane);
    return;
  }
  for (int j = lane; j < g.dim; j += 32) y[j] = x[j] * g.signs[j];
  for (int hs = 1; hs < g.dim; hs *= 2) {
    __syncwarp();
    for (int pr = lane; pr < g.dim / 2; pr += 32) {
      const int a = ((pr & ~(hs - 1)) << 1) | (pr & (hs - 1));  // (pr / hs) · 2hs + pr mod hs
      const float u = y[a], v = y[a + hs];
      y[a] = u + v;
      y[a + hs] = u - v;
    }
  }
  __syncwarp();
  for (int j = lane; j < g.dim; j += 32) y[j] *= g.gain;
  __syncwarp();
}

// Whether a codec's groups are Hadamard MSE groups that fill 128 coordinates (one group of 128
// or two of 64, no QJL): a warp then holds a vector in registers, 4 coordinates a lane (lanes
// 16–31 the second group of two), and rotates it by shuffles (butterflies_in_lanes).
__host__ __device__ inline bool rotates_in_lanes(const CodecTables& t, int head_dim) {
  if (t.term_dim != 128 || head_dim != 128) return false;
  if (t.groups != 1 && !(t.groups == 2 && t.g[0].dim == 64)) return false;
  for (int gi = 0; gi < t.groups; ++gi)
    if (t.g[gi].dense || t.g[gi].qjl || t.g[gi].mse_bits == 0) return false;
  return true;
}

// The butterflies of an unnormalized Hadamard transform of a group of `dim` (64 or 128)
// coordinates held 4 a lane, j0 the lane's first coordinate in its group: the additions of
// rotate_forward's butterflies (lower u + v, upper u − v), so the results are bit-identical.
__device__ __forceinline__ void butterflies_in_lanes(float (&y)[4], int j0, int dim) {
#pragma unroll
  for (int stage = 0; stage < 7; ++stage) {  // hs = 1 .. 64, a constant in each copy
    const int hs = 1 << stage;
    if (hs >= dim) break;
    float z[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = j0 + k;
      const float other = hs < 4 ? y[k ^ hs] : __shfl_xor_sync(0xffffffffu, y[k], hs / 4);
      z[k] = (j & hs) ? other - y[k] : y[k] + other;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) y[k] = z[k];
  }
}

// Rotates the query rows of each unit once (not once per split): per key term, q' = Π_g(scale ·
// log2 e · q_g) (and S q' for QJL terms), normalized by its largest magnitude, as float16 pairs
// [unit][term][row][coordinate / 2] with the magnitudes beside. One warp per row.
__global__ void __launch_bounds__(32 * kTileRows) prepare_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) float prep_shared[];
  let_next_start();
  const CacheView& c = p.cache;
  const int d = c.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nk = c.key.n_terms;
  const TermTables* kt = c.key.terms;
  const int qk_floats = c.key.term_dim;
  float* qbuf = prep_shared + size_t(warp) * size_t(qk_floats + 3 * d);
  float* qtmp = qbuf + qk_floats;
  // The row as given and the channel list, loaded side by side (the gather q[channel] would
  // make one load wait for the other).
  float* qraw = qtmp + d;
  int* craw = reinterpret_cast<int*>(qraw + d);
  const uint32_t unit = blockIdx.x;
  const ItemGeometry geo = item_geometry(p, unit);
  const int R = p.group;
  uint32_t* prepared = p.prepared + size_t(unit) * p.prepared_words;
  float* scales = p.row_scales + size_t(unit) * kMaxTerms * kTileRows;
  const bool in_lanes = rotates_in_lanes(c.key, d);
  for (int rho = warp; rho < kTileRows; rho += blockDim.x / 32) {
    const int i = row_token(p, geo, rho);
    if (i < 0) {
      if (lane < kMaxTerms) scales[lane * kTileRows + rho] = 0.0f;
      int at = 0;
      for (int t = 0; t < nk; ++t) {
        for (int j = lane; j < kt[t].dim / 2; j += 32)
          prepared[size_t(kTileRows) * at + size_t(rho) * (kt[t].dim / 2) + j] = 0u;
        at += kt[t].dim / 2;
      }
      continue;
    }
    const int qhead = geo.h * R + (geo.tile * kTileRows + rho) % R;
    const float* q = p.q + (size_t(p.first_row[geo.b] + uint32_t(i)) * p.q_heads + qhead) * d;
    const int16_t* channels = c.channels + ((size_t(c.layer) * c.kv_heads + geo.h) * 2) * d;
    for (int j = lane; j < d; j += 32) {
      qraw[j] = q[j];
      craw[j] = channels[j];
    }
    __syncwarp();
    if (in_lanes) {
      // In registers: the lane's 4 coordinates of its group, rotated by shuffles, then the
      // term's largest magnitude over the group's lanes and the lane's two float16 pairs.
      const int gi = c.key.groups == 2 ? lane / 16 : 0;
      const GroupTables& g = c.key.g[gi];
      const int j0 = 4 * (gi ? lane - 16 : lane), first = gi ? c.key.g[0].dim : 0;
      float y[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) y[k] = qraw[craw[first + j0 + k]] * p.scale_log2 * g.signs[j0 + k];
      butterflies_in_lanes(y, j0, g.dim);
      float mx = 0.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        y[k] *= g.gain;
        mx = fmaxf(mx, fabsf(y[k]));
      }
      for (int w = g.dim / 8; w >= 1; w /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
      const float inv = mx > 0.0f ? 1.0f / mx : 0.0f;
      if (j0 == 0) scales[gi * kTileRows + rho] = mx;
      *reinterpret_cast<uint2*>(prepared + size_t(kTileRows) * (first / 2) +
                                size_t(rho) * (g.dim / 2) + j0 / 2) =
          make_uint2(pack_half2(y[0] * inv, y[1] * inv), pack_half2(y[2] * inv, y[3] * inv));
      __syncwarp();  // qraw and craw are read before the next row overwrites them
      continue;
    }
    // Per key group, in the terms' order: q' = Π_g(scale · log2 e · q_g) in its codes slot (if
    // it has codes), then S q' in its signs slot (prod).
    int first = 0, at = 0;  // the group's first channel; its first slot in qbuf
    for (int gi = 0; gi < c.key.groups; ++gi) {
      const GroupTables& g = c.key.g[gi];
      for (int j = lane; j < g.dim; j += 32) qtmp[j] = qraw[craw[first + j]] * p.scale_log2;
      __syncwarp();
      float* rotated = qbuf + at;
      rotate_forward(g, qtmp, rotated, lane);
      if (g.mse_bits > 0) at += g.dim;
      if (g.qjl) {
        if (g.mse_bits == 0) {  // the rotation went to the signs slot itself: move it aside
          for (int j = lane; j < g.dim; j += 32) qtmp[j] = rotated[j];
          __syncwarp();
        }
        multiply(g.qjl_matrix, g.mse_bits > 0 ? rotated : qtmp, qbuf + at, g.dim, lane);
        at += g.dim;
      }
      first += g.dim;
    }
    int off = 0, words = 0;
    for (int t = 0; t < nk; ++t) {
      const float* x = qbuf + off;
      float mx = 0.0f;
      for (int j = lane; j < kt[t].dim; j += 32) mx = fmaxf(mx, fabsf(x[j]));
      for (int w = 16; w >= 1; w /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
      const float inv = mx > 0.0f ? 1.0f / mx : 0.0f;
      if (lane == 0) scales[t * kTileRows + rho] = mx;
      for (int j = lane; j < kt[t].dim / 2; j += 32)
        prepared[size_t(kTileRows) * words + size_t(rho) * (kt[t].dim / 2) + j] =
            pack_half2(x[2 * j] * inv, x[2 * j + 1] * inv);
      off += kt[t].dim;
      words += kt[t].dim / 2;
    }
    __syncwarp();
  }
}

// The block's merge of its warps' partial states (rows 0–7, each warp's in its stage ring,
// `ring_bytes` apart) into one state in the workspace, at the block's index: the splits of one
// unit, taken by the block's warps, become one split for the merge kernel. Per (row, float4 of
// the accumulator) a thread: M = max m_w, weights 2^(m_w − M), L = Σ weight · l_w, and the
// weighted sum (a warp that saw no token of a row has weight 0 and an accumulator never written:
// selected away, not multiplied).
__device__ void premerge_block(const AttentionParams& p, const uint8_t* rings,
                               uint32_t ring_bytes) {
  const int acc_dim = p.cache.value.term_dim, stride = 4 + acc_dim;
  const int chunks = acc_dim / 4, warps = int(blockDim.x / 32);
  float* merged = p.partial + size_t(blockIdx.x) * kTileRows * size_t(stride);
  for (int task = int(threadIdx.x); task < 8 * chunks; task += int(blockDim.x)) {
    const int rho = task / chunks, chunk = task % chunks;
    auto row_of = [&](int w) {
      return reinterpret_cast<const float*>(rings + size_t(w) * ring_bytes) + rho * stride;
    };
    float M = kNegInf;
    for (int w = 0; w < warps; ++w) M = fmaxf(M, row_of(w)[0]);
    float L = 0.0f;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int w = 0; w < warps; ++w) {
      const float* row = row_of(w);
      const float e = row[0] == kNegInf ? 0.0f : exp2f(row[0] - M);
      L += e * row[1];
      const float4 v = *reinterpret_cast<const float4*>(row + 4 + 4 * chunk);
      sum.x += e != 0.0f ? e * v.x : 0.0f;
      sum.y += e != 0.0f ? e * v.y : 0.0f;
      sum.z += e != 0.0f ? e * v.z : 0.0f;
      sum.w += e != 0.0f ? e * v.w : 0.0f;
    }
    float* out = merged + size_t(rho) * stride;
    if (chunk == 0) {
      out[0] = M;
      out[1] = L;
    }
    *reinterpret_cast<float4*>(out + 4 + 4 * chunk) = sum;
  }
}

template <int kTerms, int kWordsK, int kWordsV, bool kRows16, int kDim, int kKeyWidths,
          int kValueWidths>
__global__ void __launch_bounds__(block_warps(kDim) * 32, kDim > 0 ? 1 : 2)
    attention_kernel(const AttentionParams p) {
  constexpr int kRowRegs = kRows16 ? 2 : 1;  // fragment rows a lane holds: g (and g + 8)
  // Decode kernels built for fixed shapes multiply values transposed: O^T = V^T P^T, codes as A
  // (16 coordinates × 16 tokens), probabilities as B (16 tokens × 8 rows), so a tile takes 8
  // MMAs instead of 16 and every accumulator register is live. acc[t][k][e][j] is then
  // coordinate e of word kWordsV·grp + k of term t, for query row 2·quad + j: A's rows grp and
  // grp + 8 are the lane's two words (one 128-coordinate term) or coordinates e and e + 1 of its
  // word (64-coordinate terms, a word a lane). (Else: coordinate
  // 8·((2·quad + j)·per_lane + k) + e of row grp, and j + 2 of row grp + 8.)
  constexpr bool kValuesT = kDim > 0 && !kRows16;
  // Those for one 128-coordinate term per side also multiply keys as A: S = K Q^T, codes as A
  // (16 tokens × 16 coordinates), query rows as B (16 coordinates × 8 rows), so that a tile
  // takes one MMA a word half instead of two and no zero rows pad A. A lane's scores are then
  // tokens grp and grp + 8 for query rows 2·quad and 2·quad + 1, the rows whose value
  // accumulators it holds; the probabilities reach the value MMAs' B layout (tokens
  // 2·quad + {0, 1}, row grp) by one 8 × 8 transpose a half. (The fractional kernels gained
  // nothing from it: their two terms a side take two transposes each, and the softmax's
  // reductions over 8 lanes for two rows a lane cost what the MMAs saved.)
  constexpr bool kKeysA = kValuesT && kDim == 128;
  static_assert(!kKeysA || (kKeyLanesPerWord == 4 && kWordsK == 4 && kKeyWidths >= 2 &&
                            kKeyWidths <= 4),
                "keys as A: a lane's four words of one term of width 2, 3 or 4, as in B");
  // The query rows a lane's softmax state (m, l) follows: lane_row(r). A row's other lanes are
  // those of its group (xor 1, 2) or, where kKeysA, the lanes of the same lane % 4 (xor 4, 8, 16).
  constexpr int kLaneRows = kKeysA ? 2 : kRowRegs;
  auto row_reduce = [](float x, auto op) {
#pragma unroll
    for (int w = kKeysA ? 4 : 1; w < (kKeysA ? 32 : 4); w *= 2)
      x = op(x, __shfl_xor_sync(0xffffffffu, x, w));
    return x;
  };
  // 2-bit terms of 128 coordinates a side: quad lookups (quad_entry), 16 copies of 8-byte entries.
  constexpr bool kQuad = kKeysA && kKeyWidths == 2 && kValueWidths == 2;
  constexpr int kEntryBytes = kQuad ? 8 : 4;
  constexpr int kCopies = kQuad ? 16 : lut_copies(kTerms);
  extern __shared__ __align__(16) uint8_t shared[];
  const CacheView& c = p.cache;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad = lane % 4, grp = lane / 4;

  const TermTables* kt = c.key.terms;
  const TermTables* vt = c.value.terms;
  const int nk = kDim > 0 ? fixed_terms(kKeyWidths) : c.key.n_terms;
  const int nv = kDim > 0 ? fixed_terms(kValueWidths) : c.value.n_terms;
  auto key_shape = [&](int t) { return shape_of<kDim, kKeyWidths, kKeyLanesPerWord>(kt[t], t); };
  auto value_shape = [&](int t) {
    return shape_of<kDim, kValueWidths, kValueLanesPerWord>(vt[t], t);
  };

  // The code-pair tables (key terms', then value terms'): one load per entry, then its copies.
  for (int i = threadIdx.x; i < (nk + nv) * 256; i += blockDim.x) {
    const int t = i / 256, e = i % 256;
    const TermTables& x = t < nk ? kt[t] : vt[t - nk];
    const CodecTables& ct = t < nk ? c.key : c.value;
    const int width =
        kDim > 0 ? term_width(t < nk ? kKeyWidths : kValueWidths, t < nk ? t : t - nk) : 0;
    const uint32_t* pairs = x.sign ? ct.g[x.group].sign_pairs : ct.g[x.group].code_pairs;
    uint4* row = reinterpret_cast<uint4*>(shared + 256 * e + kEntryBytes * kCopies * t);
    if constexpr (kQuad) {
      const uint2 v = quad_entry(pairs, uint32_t(e));
#pragma unroll
      for (int r = 0; r < kCopies / 2; ++r) row[r] = make_uint4(v.x, v.y, v.x, v.y);
    } else {
      const uint32_t v =
          pairs[packed_width(width) ? packed_entry(uint32_t(e), width) : uint32_t(e)];
#pragma unroll
      for (int r = 0; r < kCopies / 4; ++r) row[r] = make_uint4(v, v, v, v);
    }
  }
  __syncthreads();

  const uint32_t item = blockIdx.x * (blockDim.x / 32) + uint32_t(warp);
  if (item >= p.units * uint32_t(p.splits)) return;
  const uint32_t unit = item / uint32_t(p.splits);
  const int split = int(item % uint32_t(p.splits));
  const ItemGeometry geo = item_geometry(p, unit);
  const uint32_t* pages = c.page_tables + size_t(p.slot[geo.b]) * c.page_table_stride;

  // --- this split's token range -----------------------------------------------------------------
  const uint32_t lo16 = geo.lo & ~15u;
  const uint32_t n_tiles = (geo.hi - lo16 + 15) / 16;
  const uint32_t per_split = (n_tiles + uint32_t(p.splits) - 1) / uint32_t(p.splits);
  const uint32_t t_begin = lo16 + uint32_t(split) * per_split * 16;
  const uint32_t t_end = min(geo.hi, t_begin + per_split * 16);

  auto lane_row = [&](int r) { return kKeysA ? 2 * quad + r : grp + 8 * r; };
  float m[kLaneRows], l[kLaneRows];  // l: this lane's tokens only (summed over the row's lanes)
  float acc[kTerms][kWordsV][8][2 * kRowRegs] = {};
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
  }

  // Lookups: the entry of byte `byte` of code word w in the table whose lane word is `sel`
  // (byte 0 of sel; its other bytes are 0): the permute puts the code byte in byte 1, which
  // makes the row's offset, beside sel in byte 0.
  // key term t: + kEntryBytes · kCopies · t
  const uint32_t key_sel = uint32_t(kEntryBytes) * uint32_t(lane % kCopies);
  const uint32_t value_sel = key_sel + uint32_t(kEntryBytes * kCopies * nk);
  auto entry = [&](uint32_t sel, uint32_t w, int byte) {
    return shared + __byte_perm(w, sel, 0x5504u | (uint32_t(byte) << 4));
  };
  auto lut = [&](uint32_t sel, uint32_t w, int byte) {
    return *reinterpret_cast<const uint32_t*>(entry(sel, w, byte));
  };
  auto lut_quad = [&](uint32_t sel, uint32_t w, int byte) {  // an 8-byte entry (kQuad)
    return *reinterpret_cast<const uint2*>(entry(sel, w, byte));
  };
  const uint32_t last = geo.hi - 1;

  // Tiles reach registers through this warp's ring of kStages stage buffers in shared memory,
  // filled by cp.async kStages − 1 tiles ahead; page numbers are loaded one tile further ahead,
  // so neither the codes' nor the page table's latency sits between two tiles' arithmetic.
  const uint32_t stage_bytes = c.value.stage_end;
  uint8_t* stages = shared + kTableBytes + uint32_t(warp) * kStages * stage_bytes;
  const uint32_t n = t_end > t_begin ? (t_end - t_begin + 15) / 16 : 0;
  uint32_t ahead[kStages][2];  // page numbers of the first kStages tiles' halves
#pragma unroll
  for (int j = 0; j < kStages; ++j)
    load_pages(c, pages, t_begin + 16u * uint32_t(j), last, ahead[j]);
  auto stage = [&](uint32_t j, const uint32_t(&page)[2]) {  // starts copying tile j
    uint8_t* to = stages + (j % kStages) * stage_bytes;
    if constexpr (kDim > 0)
      stage_tile_fixed<kDim, kKeyWidths, kValueWidths>(c, to, t_begin + 16u * j, page, geo.h,
                                                       lane);
    else
      stage_tile<kTerms>(c, to, t_begin + 16u * j, page, geo.h, lane);
  };
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (uint32_t(j) < n) stage(uint32_t(j), ahead[j]);
    cp_async_commit();
  }
  uint32_t page_next[2] = {ahead[kStages - 1][0], ahead[kStages - 1][1]};

  wait_for_previous();  // the prepare kernel's query rows are complete from here on
  // --- the query rows (rotated once per unit by prepare_kernel), as A fragments -----------------
  uint32_t qa[kTerms][kWordsK][2][2 * kRowRegs];  // [term][word][half: coords 0-3 / 4-7][reg]
  float row_scale[kTerms][kLaneRows];  // per term and lane row: max |q'| (log2 units)
  int pos_of_row[kLaneRows], lo_of_row[kLaneRows];
  {
    const uint32_t* prepared = p.prepared + size_t(unit) * p.prepared_words;
    const float* scales = p.row_scales + size_t(unit) * kMaxTerms * kTileRows;
    int at = 0;  // words of the terms before t, per row
#pragma unroll
    for (int t = 0; t < kTerms; ++t) {
#pragma unroll
      for (int r = 0; r < kLaneRows; ++r)
        row_scale[t][r] = t < nk ? scales[t * kTileRows + lane_row(r)] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowRegs; ++r) {
        const int rho = grp + 8 * r;
#pragma unroll
        for (int k = 0; k < kWordsK; ++k) {
          const Shape sh = key_shape(t < nk ? t : 0);
          const int word = quad * sh.per_lane + k;
          uint4 v = make_uint4(0u, 0u, 0u, 0u);
          if (t < nk && k < sh.per_lane && word < sh.words)
            v = *reinterpret_cast<const uint4*>(prepared + size_t(kTileRows) * at +
                                                size_t(rho) * (sh.dim / 2) + 4 * word);
          // Lookup byte 2h + i of a word pairs coordinates 2·o and 2·o + 1, o = i + 2h or, for
          // packed terms, packed_order(2h + i).
          const bool packed =
              kDim > 0 && !kQuad && packed_width(key_shape(t < nk ? t : 0).width);
          qa[t][k][0][2 * r] = v.x;
          qa[t][k][0][2 * r + 1] = packed ? v.z : v.y;
          qa[t][k][1][2 * r] = packed ? v.y : v.z;
          qa[t][k][1][2 * r + 1] = v.w;
        }
      }
      if (t < nk) at += key_shape(t).dim / 2;
    }
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      const int i = row_token(p, geo, lane_row(r));
      const int pos = i < 0 ? -1 : int(geo.T - p.tail[geo.b] - geo.L + uint32_t(i));
      pos_of_row[r] = pos;
      lo_of_row[r] = i < 0 ? 0
                     : p.window && uint64_t(pos) + 1 > p.window ? int(uint64_t(pos) + 1 - p.window)
                                                                : 0;
    }
  }


  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t j = i + kStages - 1;  // the tile to start copying
    if (j < n) {
      stage(j, page_next);
      load_pages(c, pages, t_begin + 16u * (j + 1), last, page_next);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // tile i's group is complete (for this lane) ...
    __syncwarp();                  // ... and for every lane
    const uint8_t* buf = stages + (i % kStages) * stage_bytes;
    const uint32_t base = t_begin + 16u * i;

    // Scores: sc[s][·] for tokens base + 8s + 2·quad + {0, 1}, rows grp (and grp + 8); where
    // kKeysA, sc[s][r] for token base + 8s + grp, row lane_row(r).
    float sc[2][2 * kRowRegs];
    if constexpr (kKeysA) {
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int r = 0; r < 2; ++r) sc[s][r] = 0.0f;
#pragma unroll
      for (int t = 0; t < kTerms; ++t) {
        if (t >= nk) break;
        const TermTables& x = kt[t];
        const Shape sh = key_shape(t);
        // Tokens grp and grp + 8 (A's rows): 4-bit words by one vector load, packed terms' words
        // assembled from their planes.
        // Two accumulator chains (the word halves), summed at the end.
        float cf[2][4] = {};
        const uint32_t sel = key_sel + uint32_t(kEntryBytes * kCopies * t);
        if constexpr (kQuad) {
          // A token's 8 code bytes (the lane's words 4·quad..4·quad + 3), byte 2k + h of them
          // coordinates 4h..4h + 3 of word k: one lookup gives what the pair lookups of bytes
          // 2h and 2h + 1 of a nibble word give below.
          uint2 kq[2];
#pragma unroll
          for (int s = 0; s < 2; ++s)
            kq[s] = *reinterpret_cast<const uint2*>(buf + x.stage_codes +
                                                    uint32_t(8 * s + grp) * sh.bytes + 8 * quad);
#pragma unroll
          for (int k = 0; k < kWordsK; ++k)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int byte = (2 * k + h) % 4;
              const uint2 a = lut_quad(sel, k < 2 ? kq[0].x : kq[0].y, byte);
              const uint2 b = lut_quad(sel, k < 2 ? kq[1].x : kq[1].y, byte);
              mma16816(cf[h], a.x, b.x, a.y, b.y, qa[t][k][h][0], qa[t][k][h][1]);
            }
        } else {
          uint32_t kw[2][kWordsK];
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const uint8_t* codes = buf + x.stage_codes + uint32_t(8 * s + grp) * sh.bytes;
            if (packed_width(sh.width))
              load_packed_keys<kWordsK, kDim>(codes, sh.width, quad * kWordsK, kw[s]);
            else
              load_words4<kWordsK, true>(codes, quad * kWordsK, sh.words, kw[s]);
          }
#pragma unroll
          for (int k = 0; k < kWordsK; ++k)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              mma16816(cf[h], lut(sel, kw[0][k], 2 * h), lut(sel, kw[1][k], 2 * h),
                       lut(sel, kw[0][k], 2 * h + 1), lut(sel, kw[1][k], 2 * h + 1),
                       qa[t][k][h][0], qa[t][k][h][1]);
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const float n = staged_scale<kDim>(c.key, x, false, buf, uint32_t(8 * s + grp), true);
#pragma unroll
          for (int r = 0; r < 2; ++r)
            sc[s][r] += (cf[0][2 * s + r] + cf[1][2 * s + r]) * n * row_scale[t][r];
        }
      }
    } else {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int r = 0; r < 2 * kRowRegs; ++r) sc[s][r] = 0.0f;
#pragma unroll
        for (int t = 0; t < kTerms; ++t) {
          if (t >= nk) break;
          const TermTables& x = kt[t];
          const Shape sh = key_shape(t);
          const uint8_t* codes = buf + x.stage_codes + uint32_t(8 * s + grp) * sh.bytes;
          // Four independent accumulator chains (word parity × half), summed at the end: one
          // chain would put all 2·kWordsK MMAs of the term in a row, each waiting for the last.
          float cf4[4][4] = {};
          // 4-bit words come with one vector load; other widths word by word, as they are used.
          // Packed terms' words come assembled from their planes (two or three loads).
          const bool packed = kDim > 0 && packed_width(sh.width);
          const bool vector = sh.width == 4 && sh.per_lane == kWordsK && sh.bytes % 16 == 0;
          uint32_t kw[kWordsK] = {};
          if constexpr (kDim > 0) {
            if (packed) load_packed_keys<kWordsK, kDim>(codes, sh.width, quad * kWordsK, kw);
          }
          if (vector) load_words4<kWordsK, (kDim > 0)>(codes, quad * sh.per_lane, sh.words, kw);
#pragma unroll
          for (int k = 0; k < kWordsK; ++k) {
            if (k >= sh.per_lane) break;
            const int word = quad * sh.per_lane + k;
            const uint32_t w = vector || packed ? kw[k]
                               : word < sh.words ? load_word(codes, sh.width, sh.dim, word) : 0u;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t sel = key_sel + uint32_t(kEntryBytes * kCopies * t);
              const uint32_t b0 = lut(sel, w, 2 * h);
              const uint32_t b1 = lut(sel, w, 2 * h + 1);
              float (&chain)[4] = cf4[2 * (k & 1) + h];
              if constexpr (kRows16)
                mma16816(chain, qa[t][k][h][0], qa[t][k][h][2], qa[t][k][h][1], qa[t][k][h][3], b0,
                         b1);
              else
                mma16816_rows8(chain[0], chain[1], qa[t][k][h][0], qa[t][k][h][1], b0, b1);
            }
          }
          float cf[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) cf[e] = (cf4[0][e] + cf4[1][e]) + (cf4[2][e] + cf4[3][e]);
          const uint32_t j0 = uint32_t(8 * s + 2 * quad);
          const float n0 = staged_scale<kDim>(c.key, x, sh.sign, buf, j0, true);
          const float n1 = staged_scale<kDim>(c.key, x, sh.sign, buf, j0 + 1, true);
          sc[s][0] += cf[0] * n0 * row_scale[t][0];
          sc[s][1] += cf[1] * n1 * row_scale[t][0];
          if constexpr (kRows16) {
            sc[s][2] += cf[2] * n0 * row_scale[t][1];
            sc[s][3] += cf[3] * n1 * row_scale[t][1];
          }
        }
      }
    }
    // Mask (tokens past the sequence's end included: their slots hold finite data), then the
    // online softmax per row. A row's maximum m moves only where some score of the tile exceeds
    // it, which each lane sees from its own scores: only then (one vote; rare after a split's
    // first tiles) does the warp reduce the tile's maxima and rescale, else m stays and the
    // correction is 1, as the reduction would have found.
    // (A lane's scores of row r: sc[s][2r + j], tokens base + 8s + 2·quad + j; where kKeysA,
    // sc[s][r], token base + 8s + grp. The row's other tokens are in its other lanes.)
    constexpr int kTokens = kKeysA ? 1 : 2;  // a lane's tokens of a row in each half
    auto score = [&](float (&x)[2][2 * kRowRegs], int s, int r, int j) -> float& {
      return kKeysA ? x[s][r] : x[s][2 * r + j];
    };
    float pr[2][2 * kRowRegs];
    float corr[kLaneRows], mx_lane[kLaneRows];
    bool grows = false;
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      float mx = kNegInf;
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < kTokens; ++j) {
          const int tok = int(base) + 8 * s + (kKeysA ? grp : 2 * quad + j);
          const bool visible = tok <= pos_of_row[r] && tok >= lo_of_row[r];
          float& v = score(sc, s, r, j);
          v = visible ? v : kNegInf;
          mx = fmaxf(mx, v);
        }
      mx_lane[r] = mx;
      grows |= mx > m[r];
    }
    const bool grown = __any_sync(0xffffffffu, grows);
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      const float mx =
          grown ? row_reduce(mx_lane[r], [](float a, float b) { return fmaxf(a, b); }) : m[r];
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // no token visible yet: all give 0
      corr[r] = m[r] == m_new ? 1.0f : fast_exp2(m[r] - m_new);  // 2^−∞ = 0
      float sum = 0.0f;
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < kTokens; ++j) {
          const float e = fast_exp2(score(sc, s, r, j) - m_use);
          score(pr, s, r, j) = e;
          sum += e;
        }
      l[r] = l[r] * corr[r] + sum;
      m[r] = m_new;
    }
    // Rescale the accumulators only when some row's maximum moved.
    bool moved = false;
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) moved |= corr[r] != 1.0f;
    if (grown && __any_sync(0xffffffffu, moved)) {
      if constexpr (kValuesT) {
        // Rows 2·quad + j: the lane's own (kKeysA), else those of the lanes of group 2·quad + j.
        float c0, c1;
        if constexpr (kKeysA) {
          c0 = corr[0];
          c1 = corr[1];
        } else {
          c0 = __shfl_sync(0xffffffffu, corr[0], 8 * quad);
          c1 = __shfl_sync(0xffffffffu, corr[0], 8 * quad + 4);
        }
#pragma unroll
        for (int t = 0; t < kTerms; ++t)
#pragma unroll
          for (int k = 0; k < kWordsV; ++k)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              acc[t][k][e][0] *= c0;
              acc[t][k][e][1] *= c1;
            }
      } else {
#pragma unroll
        for (int t = 0; t < kTerms; ++t)
#pragma unroll
          for (int k = 0; k < kWordsV; ++k)
#pragma unroll
            for (int e = 0; e < 8; ++e)
#pragma unroll
              for (int r = 0; r < kRowRegs; ++r) {
                acc[t][k][e][2 * r] *= corr[r];
                acc[t][k][e][2 * r + 1] *= corr[r];
              }
      }
    }

    // Values: tokens base + 2·quad + {0, 1, 8, 9}.
    uint32_t vtok[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) vtok[j] = uint32_t(2 * quad + (j & 1) + 8 * (j >> 1));
#pragma unroll
    for (int t = 0; t < kTerms; ++t) {
      if (t >= nv) break;
      const TermTables& x = vt[t];
      const Shape sh = value_shape(t);
      const uint32_t sel = value_sel + uint32_t(kEntryBytes * kCopies * t);
      uint32_t pa[4];
      if constexpr (kKeysA) {
        // Tokens 8s + grp's probabilities of rows 2·quad + {0, 1}, scaled by the value norms,
        // are row grp of an 8 × 8 matrix a half: transposed, tokens 8s + 2·quad + {0, 1} of row
        // grp, the B fragment.
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const float n = staged_scale<kDim>(c.value, x, false, buf, uint32_t(8 * s + grp), false);
          pa[2 * s] = transpose8x8(pack_half2(pr[s][0] * n, pr[s][1] * n));
          pa[2 * s + 1] = 0u;  // unused: the transposed value MMAs take pa[0] and pa[2] as B
        }
      } else {
        float sv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          sv[j] = staged_scale<kDim>(c.value, x, sh.sign, buf, vtok[j], false);
        constexpr int kHi = 2 * kRowRegs - 2;  // row grp + 8's first register (kRows16)
        pa[0] = pack_half2(pr[0][0] * sv[0], pr[0][1] * sv[1]);
        pa[1] = kRows16 ? pack_half2(pr[0][kHi] * sv[0], pr[0][kHi + 1] * sv[1]) : 0u;
        pa[2] = pack_half2(pr[1][0] * sv[2], pr[1][1] * sv[3]);
        pa[3] = kRows16 ? pack_half2(pr[1][kHi] * sv[2], pr[1][kHi + 1] * sv[3]) : 0u;
      }
      const bool vector = sh.width == 4 && sh.per_lane == kWordsV && sh.bytes % 16 == 0;
      const uint8_t* rows[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) rows[j] = buf + x.stage_codes + vtok[j] * sh.bytes;
      if constexpr (kQuad) {
        // The lane's two words of each token (4 bytes: coordinate i at bits 2i). Byte b of
        // pair[p] (tokens 0, 1) holds both tokens' codes of coordinates 4b + p and 4b + p + 2
        // (b = 0, 1: word 0; b = 2, 3: word 1), so its lookup is A's registers for both.
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = *reinterpret_cast<const uint32_t*>(rows[j] + 4 * grp);
        const uint32_t pair[2][2] = {
            {bit_select(w[0], 0x33333333u, w[1] << 2), bit_select(w[0] >> 2, 0x33333333u, w[1])},
            {bit_select(w[2], 0x33333333u, w[3] << 2), bit_select(w[2] >> 2, 0x33333333u, w[3])}};
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
          for (int par = 0; par < 2; ++par) {
            const uint2 a0 = lut_quad(sel, pair[0][par], b), a1 = lut_quad(sel, pair[0][par], b + 2);
            const uint2 a2 = lut_quad(sel, pair[1][par], b), a3 = lut_quad(sel, pair[1][par], b + 2);
            const int e = 4 * b + par;
            mma16816(acc[t][0][e][0], acc[t][0][e][1], acc[t][1][e][0], acc[t][1][e][1], a0.x,
                     a1.x, a2.x, a3.x, pa[0], pa[2]);
            mma16816(acc[t][0][e + 2][0], acc[t][0][e + 2][1], acc[t][1][e + 2][0],
                     acc[t][1][e + 2][1], a0.y, a1.y, a2.y, a3.y, pa[0], pa[2]);
          }
        continue;
      }
      // Lookup words by (word, parity): byte b of ab[k][p] pairs coordinate 2·o + p of word k
      // of tokens 0 and 1 (cd: tokens 2 and 3), o = b or, for packed terms, packed_order(b).
      uint32_t ab[kWordsV][2] = {}, cd[kWordsV][2] = {};
      const bool packed = kDim > 0 && packed_width(sh.width);
      if constexpr (kDim > 0) {
        if (packed) {
          load_packed_values<kWordsV, kDim>(rows[0], rows[1], sh.width, grp * kWordsV, ab);
          load_packed_values<kWordsV, kDim>(rows[2], rows[3], sh.width, grp * kWordsV, cd);
        }
      }
      if (!packed) {
        uint32_t vw[4][kWordsV] = {};  // [token][word], 4-bit words by vector loads
        if (vector) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            load_words4<kWordsV, (kDim > 0)>(rows[j], grp * sh.per_lane, sh.words, vw[j]);
        }
#pragma unroll
        for (int k = 0; k < kWordsV; ++k) {
          if (k >= sh.per_lane) break;
          const int word = grp * sh.per_lane + k;
          uint32_t w[4] = {vw[0][k], vw[1][k], vw[2][k], vw[3][k]};
          if (!vector && word < sh.words)
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] = load_word(rows[j], sh.width, sh.dim, word);
          ab[k][0] = bit_select(w[0], 0x0f0f0f0fu, w[1] << 4);
          ab[k][1] = bit_select(w[0] >> 4, 0x0f0f0f0fu, w[1]);
          cd[k][0] = bit_select(w[2], 0x0f0f0f0fu, w[3] << 4);
          cd[k][1] = bit_select(w[2] >> 4, 0x0f0f0f0fu, w[3]);
        }
      }
      // Coordinate e of a word: parity e % 2, byte of pair e / 2.
      auto byte_of = [&](int e) { return packed ? packed_order(e >> 1) : e >> 1; };
      if constexpr (kValuesT && kWordsV == 2) {
        // Both of this lane's words in one MMA a coordinate (rows grp and grp + 8 of A).
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int byte = byte_of(e);
          mma16816(acc[t][0][e][0], acc[t][0][e][1], acc[t][1][e][0], acc[t][1][e][1],
                   lut(sel, ab[0][e & 1], byte), lut(sel, ab[1][e & 1], byte),
                   lut(sel, cd[0][e & 1], byte), lut(sel, cd[1][e & 1], byte), pa[0], pa[2]);
        }
      } else if constexpr (kValuesT) {
        // A word a lane: coordinates e and e + 1 (one byte of pairs, both parities) in one MMA.
        static_assert(kWordsV == 1, "one or two value words a lane");
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          const int byte = byte_of(e);
          mma16816(acc[t][0][e][0], acc[t][0][e][1], acc[t][0][e + 1][0], acc[t][0][e + 1][1],
                   lut(sel, ab[0][0], byte), lut(sel, ab[0][1], byte), lut(sel, cd[0][0], byte),
                   lut(sel, cd[0][1], byte), pa[0], pa[2]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kWordsV; ++k) {
          if (k >= sh.per_lane) break;
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const uint32_t b0 = lut(sel, ab[k][e & 1], byte_of(e));
            const uint32_t b1 = lut(sel, cd[k][e & 1], byte_of(e));
            if constexpr (kRows16)
              mma16816(acc[t][k][e], pa[0], pa[1], pa[2], pa[3], b0, b1);
            else
              mma16816_rows8(acc[t][k][e][0], acc[t][k][e][1], pa[0], pa[2], b0, b1);
          }
        }
      }
    }
    __syncwarp();  // every lane is done with this buffer before the next iteration refills it
  }
  cp_async_wait<0>();  // no copy may outlive the warp (empty groups complete at once)
  let_next_start();

  // --- this item's partial state ------------------------------------------------------------------
  // Into the warp's own (now idle) stage ring where the block merges its warps' states first
  // (decode tiles: rows 0–7 only; the launch checks that they fit), else into the workspace.
  const int acc_dim = c.value.term_dim;
  const bool premerge = kDim > 0 && p.premerge > 0;
  float* state = premerge ? reinterpret_cast<float*>(stages)
                          : p.partial + size_t(item) * kTileRows * size_t(4 + acc_dim);
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
    const float lt = row_reduce(l[r], [](float a, float b) { return a + b; });
    const int rho = lane_row(r);
    float* row = state + size_t(rho) * (4 + acc_dim);
    if ((kKeysA ? grp : quad) == 0) {
      row[0] = m[r];
      row[1] = lt;
    }
    if constexpr (kValuesT) {
      // Rows 2·quad + j, words kWordsV·grp + k of each term (8 coordinates each): where kKeysA
      // the lane's row r, else both (their m in the lanes of group 2·quad + j).
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (kKeysA && j != r) continue;
        const float mj = kKeysA ? m[r] : __shfl_sync(0xffffffffu, m[0], 4 * (2 * quad + j));
        if (mj == kNegInf) continue;
        float* out = state + size_t(2 * quad + j) * (4 + acc_dim) + 4;
#pragma unroll
        for (int t = 0; t < kTerms; ++t) {
          if (t >= nv) break;
#pragma unroll
          for (int k = 0; k < kWordsV; ++k) {
            const auto& a = acc[t][k];
            float4* dst =
                reinterpret_cast<float4*>(out + vt[t].acc_offset + 8 * (kWordsV * grp + k));
            dst[0] = make_float4(a[0][j], a[1][j], a[2][j], a[3][j]);
            dst[1] = make_float4(a[4][j], a[5][j], a[6][j], a[7][j]);
          }
        }
      }
    } else {
      if (m[r] == kNegInf) continue;
#pragma unroll
      for (int t = 0; t < kTerms; ++t) {
        if (t >= nv) break;
        const TermTables& x = vt[t];
        const Shape sh = value_shape(t);
#pragma unroll
        for (int k = 0; k < kWordsV; ++k) {
          if (k >= sh.per_lane) break;
#pragma unroll
          for (int col = 0; col < 2; ++col) {
            const int word = (2 * quad + col) * sh.per_lane + k;
            if (word >= sh.words) continue;
            // 8 consecutive floats, 16-byte aligned (rows and offsets are multiples of 4 floats).
            float4* dst = reinterpret_cast<float4*>(row + 4 + x.acc_offset + 8 * word);
            dst[0] = make_float4(acc[t][k][0][2 * r + col], acc[t][k][1][2 * r + col],
                                 acc[t][k][2][2 * r + col], acc[t][k][3][2 * r + col]);
            dst[1] = make_float4(acc[t][k][4][2 * r + col], acc[t][k][5][2 * r + col],
                                 acc[t][k][6][2 * r + col], acc[t][k][7][2 * r + col]);
          }
        }
      }
    }
  }
  if constexpr (kDim > 0) {
    if (premerge) {
      __syncthreads();
      premerge_block(p, shared + kTableBytes, kStages * stage_bytes);
    }
  }
}

// Merges the splits of one (unit, row) and writes the output row: per value group
// out_g = Π_gᵀ (a_codes + √(π/2)/d_g · Sᵀ a_signs) / l, scattered to the group's channels.
// Threads of a merge block: 128, or up to 512 where there are many splits, so that a thread
// sums at most ~8 of them (a chain of dependent loads per thread is what a short context waits
// for), without idle threads where there are few.
constexpr int kMergeThreads = 512;
int merge_threads(int splits, int acc_dim) {
  const int chunks = acc_dim / 4;  // float4s of a row's accumulator
  const int wanted = chunks * ((splits + 7) / 8);
  return std::clamp((wanted + 31) / 32 * 32, 128, kMergeThreads);
}

// The row a merge block takes (block = unit · 16 + ρ): its splits' states, where its output
// goes, and its value channels and offsets; live is false for a row the tile does not have.
struct MergeRow {
  bool live = false;
  const float* states = nullptr;  // split s at states + s · 16 · (4 + term_dim)
  float* out = nullptr;
  float* state = nullptr;  // with AttentionParams::states: the row's state (out = state + 4)
  const int16_t* channels = nullptr;  // [head_dim]: source channel of each group channel
  const float* offsets = nullptr;     // centering offsets of the source channels, or null
};

// A partial state's m and l (by one thread), and what its outputs are multiplied by: L for a
// state (it holds l · o), else 1.
__device__ __forceinline__ float finish_state(const MergeRow& r, float M, float L, bool writer) {
  if (!r.state) return 1.0f;
  if (writer) *reinterpret_cast<float4*>(r.state) = make_float4(M, L, 0.0f, 0.0f);
  return L;
}

__device__ MergeRow merge_row(const AttentionParams& p) {
  const CacheView& c = p.cache;
  const uint32_t unit = blockIdx.x / kTileRows;
  const int rho = int(blockIdx.x % kTileRows);
  const ItemGeometry geo = item_geometry(p, unit);
  const int i = row_token(p, geo, rho);
  MergeRow r;
  if (i < 0) return r;
  r.live = true;
  const int acc_dim = c.value.term_dim, d = c.head_dim;
  r.states = p.partial + (size_t(unit) * p.splits * kTileRows + size_t(rho)) * (4 + acc_dim);
  const int qhead = geo.h * p.group + (geo.tile * kTileRows + rho) % p.group;
  const size_t out_row = size_t(p.first_row[geo.b] + uint32_t(i)) * p.q_heads + qhead;
  if (p.states) {
    r.state = p.states + out_row * (4 + d);
    r.out = r.state + 4;
  } else {
    r.out = p.out + out_row * d;
  }
  const size_t index = (size_t(c.layer) * c.kv_heads + geo.h) * 2 + 1;
  r.channels = c.channels + index * d;
  // Centered values: the output is μ_V + Σ p (v − μ_V), as the weights sum to 1.
  r.offsets = c.value.center ? c.offsets + index * d : nullptr;
  return r;
}

__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const AttentionParams p) {
  extern __shared__ __align__(16) float buf[];
  wait_for_previous();
  const CacheView& c = p.cache;
  const MergeRow row = merge_row(p);
  if (!row.live) return;
  const int acc_dim = c.value.term_dim, d = c.head_dim;
  const int chunks = acc_dim / 4;  // float4s of a row's accumulator
  const int phases = max(1, int(blockDim.x) / chunks);  // threads that share a float4, over splits
  float* a = buf;                              // [phases][acc_dim]
  float* y = buf + size_t(phases) * acc_dim;   // [d]
  float* weight = y + d;                       // [splits]
  __shared__ float reduce[32];
  const size_t stride = size_t(kTileRows) * size_t(4 + acc_dim);
  const float* first = row.states;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  // The splits' maxima, then weights 2^(m_s − M): parallel over splits (independent loads).
  float M = kNegInf;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) M = fmaxf(M, first[s * stride]);
  for (int w = 16; w >= 1; w /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, w));
  if (lane == 0) reduce[warp] = M;
  __syncthreads();
  M = reduce[0];
  for (int w = 1; w < warps; ++w) M = fmaxf(M, reduce[w]);
  __syncthreads();
  float L = 0.0f;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) {
    const float ms = first[s * stride];
    const float e = ms == kNegInf ? 0.0f : exp2f(ms - M);
    weight[s] = e;
    L += e * first[s * stride + 1];
  }
  for (int w = 16; w >= 1; w /= 2) L += __shfl_xor_sync(0xffffffffu, L, w);
  if (lane == 0) reduce[warp] = L;
  __syncthreads();
  L = 0.0f;
  for (int w = 0; w < warps; ++w) L += reduce[w];
  // Accumulators: thread (phase, chunk) sums splits s ≡ phase (mod phases), 16-byte loads.
  for (int t = threadIdx.x; t < phases * chunks; t += blockDim.x) {
    const int chunk = t % chunks, phase = t / chunks;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int s = phase; s < p.splits; s += phases) {
      // No branch, so the unrolled loads are all in flight at once; a split that saw no token
      // has weight 0 and an accumulator never written (selected away, not multiplied: it may
      // hold anything).
      const float w = weight[s];
      const float4 v = *reinterpret_cast<const float4*>(first + s * stride + 4 + 4 * chunk);
      sum.x += w != 0.0f ? w * v.x : 0.0f;
      sum.y += w != 0.0f ? w * v.y : 0.0f;
      sum.z += w != 0.0f ? w * v.z : 0.0f;
      sum.w += w != 0.0f ? w * v.w : 0.0f;
    }
    *reinterpret_cast<float4*>(a + size_t(phase) * acc_dim + 4 * chunk) = sum;
  }
  __syncthreads();
  const float invL = 1.0f / L;
  const float out_scale = finish_state(row, M, L, threadIdx.x == 0);
  for (int j = threadIdx.x; j < acc_dim; j += blockDim.x) {
    float v = 0.0f;
    for (int ph = 0; ph < phases; ++ph) v += a[size_t(ph) * acc_dim + j];
    a[j] = v * invL;
  }
  __syncthreads();
  float* out = row.out;
  const int16_t* channels = row.channels;
  const float* offsets = row.offsets;
  int at = 0, first_channel = 0;
  for (int gi = 0; gi < c.value.groups; ++gi) {
    const GroupTables& g = c.value.g[gi];
    const float* codes = g.mse_bits > 0 ? a + at : nullptr;
    const float* signs = g.qjl ? a + at + (g.mse_bits > 0 ? g.dim : 0) : nullptr;
    for (int j = threadIdx.x; j < g.dim; j += blockDim.x) {
      float v = codes ? codes[j] : 0.0f;
      if (signs) {
        float s = 0.0f;
        for (int r = 0; r < g.dim; ++r) s += g.qjl_matrix[size_t(r) * g.dim + j] * signs[r];
        v += g.qjl_factor * s;
      }
      y[j] = v;
    }
    __syncthreads();
    if (!g.dense) {
      for (int hs = 1; hs < g.dim; hs *= 2) {
        for (int pr = threadIdx.x; pr < g.dim / 2; pr += blockDim.x) {
          const int x = ((pr & ~(hs - 1)) << 1) | (pr & (hs - 1));  // (pr / hs) · 2hs + pr mod hs
          const float u = y[x], v = y[x + hs];
          y[x] = u + v;
          y[x + hs] = u - v;
        }
        __syncthreads();
      }
      for (int j = threadIdx.x; j < g.dim; j += blockDim.x) {
        const int ch = channels[first_channel + j];
        out[ch] = (y[j] * g.gain * g.signs[j] + (offsets ? offsets[ch] : 0.0f)) * out_scale;
      }
    } else {
      for (int col = threadIdx.x; col < g.dim; col += blockDim.x) {
        float s = 0.0f;
        for (int r = 0; r < g.dim; ++r) s += g.rotation[size_t(r) * g.dim + col] * y[r];
        const int ch = channels[first_channel + col];
        out[ch] = (s + (offsets ? offsets[ch] : 0.0f)) * out_scale;
      }
    }
    __syncthreads();
    at += g.dim * ((g.mse_bits > 0 ? 1 : 0) + (g.qjl ? 1 : 0));
    first_channel += g.dim;
  }
}

// The merge of one (unit, row) by one warp, for value codecs whose Hadamard MSE groups fill 128
// coordinates (one group of 128 or two of 64) and at most kWarpMergeSplits splits, as where the
// blocks merged their warps' states first: the splits' states are all loaded at once (lane s
// holds split s's m and l; every lane 4 coordinates of each accumulator) and the inverse
// rotation runs in registers, by shuffles (the butterflies' operations as in merge_kernel), so
// no block barrier and no dependent load sit in the chain a short context waits for.
constexpr int kWarpMergeSplits = 32;
__global__ void __launch_bounds__(32) merge_warp_kernel(const AttentionParams p) {
  wait_for_previous();
  const CacheView& c = p.cache;
  const MergeRow row = merge_row(p);
  if (!row.live) return;
  const int lane = int(threadIdx.x);
  constexpr int kAcc = 128;
  const size_t stride = size_t(kTileRows) * (4 + kAcc);
  const float* first = row.states;
  const int splits = p.splits;
  float ms = kNegInf, ls = 0.0f;
  if (lane < splits) {
    ms = first[lane * stride];
    ls = first[lane * stride + 1];
  }
  float4 v[8];  // the first 8 accumulators' coordinates 4·lane .. 4·lane + 3, loaded with m, l
#pragma unroll
  for (int s = 0; s < 8; ++s)
    v[s] = s < splits ? *reinterpret_cast<const float4*>(first + s * stride + 4 + 4 * lane)
                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float M = ms;
  for (int w = 16; w >= 1; w /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, w));
  const float e = ms == kNegInf ? 0.0f : exp2f(ms - M);
  float L = e * ls;
  for (int w = 16; w >= 1; w /= 2) L += __shfl_xor_sync(0xffffffffu, L, w);
  float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // A split that saw no token has weight 0 and an accumulator never written: selected away.
  auto add = [&](float w, const float4& a) {
    y[0] += w != 0.0f ? w * a.x : 0.0f;
    y[1] += w != 0.0f ? w * a.y : 0.0f;
    y[2] += w != 0.0f ? w * a.z : 0.0f;
    y[3] += w != 0.0f ? w * a.w : 0.0f;
  };
#pragma unroll
  for (int s = 0; s < 8; ++s) add(__shfl_sync(0xffffffffu, e, s), v[s]);
  for (int s0 = 8; s0 < splits; s0 += 8) {
#pragma unroll
    for (int s = 0; s < 8; ++s)
      v[s] = s0 + s < splits
                 ? *reinterpret_cast<const float4*>(first + (s0 + s) * stride + 4 + 4 * lane)
                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int s = 0; s < 8; ++s) add(__shfl_sync(0xffffffffu, e, (s0 + s) % 32), v[s]);
  }
  const float invL = 1.0f / L;
  const float out_scale = finish_state(row, M, L, lane == 0);
#pragma unroll
  for (int k = 0; k < 4; ++k) y[k] *= invL;
  // The lane's group (lanes 0–15 and 16–31 for two of 64) and its coordinates there.
  const int gi = c.value.groups == 2 ? lane / 16 : 0;
  const GroupTables& g = c.value.g[gi];
  const int j0 = 4 * (gi ? lane - 16 : lane);
  butterflies_in_lanes(y, j0, g.dim);
  const int16_t* channels = row.channels + (gi ? c.value.g[0].dim : 0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int ch = channels[j0 + k];
    row.out[ch] = (y[k] * g.gain * g.signs[j0 + k] + (row.offsets ? row.offsets[ch] : 0.0f)) *
                  out_scale;
  }
}

// Whether merge_warp_kernel takes this launch's merge.
bool warp_merges(const AttentionParams& p) {
  return p.splits <= kWarpMergeSplits && rotates_in_lanes(p.cache.value, p.cache.head_dim);
}

// Launches kernel(p) on `stream`, allowed to start before the kernel ahead of it ends (it waits
// in wait_for_previous) where the code running supports that (compute capability 9.0 and later).
void launch_early(void (*kernel)(AttentionParams), const AttentionParams& p, uint32_t blocks,
                  int threads, size_t smem, CudaStream stream) {
  // The kernel that runs must contain the wait: its code must come from PTX of sm_90 or later
  // (code JIT-compiled from compute_80 PTX on an H100 has none, so it is launched as usual).
  cudaFuncAttributes attributes{};
  TQKV_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &early;
  config.numAttrs = attributes.ptxVersion >= 90 ? 1 : 0;
  TQKV_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

// Launches the kernel; with p.splits == 0 first chooses the splits so that the items fill one
// wave of the GPU at this kernel's occupancy (a partial second wave would idle most SMs).
template <int kTerms, int kWordsK, int kWordsV, bool kRows16, int kDim = 0, int kKeyWidths = 0,
          int kValueWidths = 0>
void launch(Device device, AttentionParams& p, size_t warp_stage_bytes, CudaStream stream) {
  int smem_limit = 0;
  TQKV_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                         device.index));
  const size_t room = size_t(smem_limit) > kTableBytes ? size_t(smem_limit) - kTableBytes : 0;
  int warps = int(std::min<size_t>(size_t(block_warps(kDim)), room / warp_stage_bytes));
  TQKV_CHECK(warps >= 1, "GPU attention: this codec needs ", kTableBytes + warp_stage_bytes,
             " bytes of shared memory per block; ", to_string(device), " allows ", smem_limit);
  auto kernel = attention_kernel<kTerms, kWordsK, kWordsV, kRows16, kDim, kKeyWidths, kValueWidths>;
  const size_t smem_max = kTableBytes + size_t(warps) * warp_stage_bytes;
  if (smem_max > 48 * 1024)
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(smem_max)));
  if (p.splits == 0) {
    const uint32_t tiles = std::max(1u, (p.max_tokens + 15) / 16);
    const uint32_t sms = uint32_t(multiprocessors(device));
    // The splits that fill one wave of w-warp blocks, and the tiles the busiest SM then takes.
    auto plan = [&](int w_warps, uint32_t& splits) {
      int blocks_per_sm = 0;
      TQKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks_per_sm, kernel, w_warps * 32, kTableBytes + size_t(w_warps) * warp_stage_bytes));
      const uint32_t per_sm = uint32_t(std::max(1, blocks_per_sm));
      const uint32_t w = uint32_t(w_warps), wave = sms * per_sm * w;
      if constexpr (kDim > 0) {
        // Blocks merge their warps' states (premerge), so splits cost the merge kernel little:
        // splits of at least 2 tiles, as many as share the tiles evenly, rounded to whole
        // blocks a unit (up, idle warps included, while the items still fit in one wave).
        const uint32_t want = std::max(1u, std::min(wave / p.units, tiles / 2));
        const uint32_t per_split = (tiles + want - 1) / want;
        const uint32_t even = (tiles + per_split - 1) / per_split;
        uint32_t blocks = (even + w - 1) / w;
        if (blocks * w * p.units > wave) blocks = even / w;
        splits = blocks > 0 ? blocks * w : even;
        const uint64_t all_blocks = (uint64_t(p.units) * splits + w - 1) / w;
        return (all_blocks + uint64_t(sms) * per_sm - 1) / (uint64_t(sms) * per_sm) * per_sm * w *
               per_split;
      } else {
        // At least kStages tiles a split: a warp's whole ring is in flight at once, and fewer
        // partial states leave less for the merge (short contexts).
        splits = std::max(1u, std::min(wave / p.units, tiles / kStages));
        return uint64_t(0);
      }
    };
    uint32_t splits = 0;
    const uint64_t cost = plan(warps, splits);
    // Blocks of 16 warps (kernels of ≤ 128 registers) leave SMs idle on short contexts, where
    // the 12 of the other fixed kernels spread the same tiles wider: the busiest SM decides.
    if (kDim > 0 && warps > kFixedWarps) {
      uint32_t narrow = 0;
      if (plan(kFixedWarps, narrow) < cost) {
        warps = kFixedWarps;
        splits = narrow;
      }
    }
    p.splits = int(splits);
  }
  const size_t smem = kTableBytes + size_t(warps) * warp_stage_bytes;
  p.splits = int(std::max(1u, std::min(uint32_t(p.splits), p.max_items / p.units)));
  // Blocks of one unit (decode tiles of the fixed kernels) merge their warps' states, where a
  // state fits in a warp's stage ring.
  const size_t state_bytes = size_t(kTileRows / 2) * size_t(4 + p.cache.value.term_dim) * 4;
  p.premerge = kDim > 0 && p.splits % warps == 0 && state_bytes <= warp_stage_bytes ? warps : 0;
  const uint32_t items = p.units * uint32_t(p.splits);
  launch_early(kernel, p, (items + warps - 1) / warps, warps * 32, smem, stream);
}

}  // namespace

void launch_attention(Device device, const AttentionParams& params, CudaStream stream) {
  DeviceGuard guard(device);
  AttentionParams p = params;
  if (p.units == 0) return;
  const CacheView& c = p.cache;
  const int terms = std::max(c.key.n_terms, c.value.n_terms);
  int max_dim = 0;
  for (const CodecTables* t : {&c.key, &c.value})
    for (int g = 0; g < t->groups; ++g) max_dim = std::max(max_dim, t->g[g].dim);
  const int qk_floats = c.key.term_dim;
  // Shared memory: the code-pair tables, then each warp's stage buffers (launch adds up).
  const size_t smem = size_t(kStages) * c.value.stage_end;
  // One warp per row; a row's scratch: rotated terms, gathered row, the row, its channel list.
  const size_t prep_smem = size_t(kTileRows) * size_t(qk_floats + 3 * c.head_dim) * 4;
  if (prep_smem > 48 * 1024)
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(prepare_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(prep_smem)));
  prepare_kernel<<<p.units, 32 * kTileRows, prep_smem, stream>>>(p);
  TQKV_CUDA_CHECK_LAUNCH("prepare_kernel");
  const bool rows16 = p.group * int(*std::max_element(p.queries, p.queries + p.batch)) > 8;
  // Decode with the common codecs (float16 norms, MSE only) runs kernels built for their shape:
  // one term of 128 coordinates per side, keys and values of the same width 2, 3 or 4; or the
  // fractional 3.5 / 2.5 bits at d = 128 (terms of 64 coordinates at 4 + 3 / 3 + 2 bits).
  // A side's widths as those kernels name them (shape_of), or 0 for any other shape.
  auto fixed_widths = [](const CodecTables& t) {
    for (int i = 0; i < t.n_terms; ++i)
      if (t.terms[i].sign) return 0;
    if (t.n_terms == 1 && t.terms[0].dim == 128) return t.terms[0].width;
    if (t.n_terms == 2 && t.terms[0].dim == 64 && t.terms[1].dim == 64)
      return t.terms[0].width + 10 * t.terms[1].width;
    return 0;
  };
  const bool fixed = !rows16 && c.key.norm_f16 && c.value.norm_f16;
  const int kw = fixed ? fixed_widths(c.key) : 0, vw = fixed ? fixed_widths(c.value) : 0;
  const bool fractional = (kw == 34 || kw == 23) && (vw == 34 || vw == 23);
  // Otherwise: terms ≤ 1 with coordinates ≤ 256 per term, or ≤ 2 / ≤ 4 terms of ≤ 128.
  if (kw == vw && kw >= 2 && kw <= 4) {
    if (kw == 4) launch<1, 4, 2, false, 128, 4, 4>(device, p, smem, stream);
    if (kw == 3) launch<1, 4, 2, false, 128, 3, 3>(device, p, smem, stream);
    if (kw == 2) launch<1, 4, 2, false, 128, 2, 2>(device, p, smem, stream);
  } else if (fractional) {
    if (kw == 34 && vw == 34) launch<2, 2, 1, false, 64, 34, 34>(device, p, smem, stream);
    if (kw == 34 && vw == 23) launch<2, 2, 1, false, 64, 34, 23>(device, p, smem, stream);
    if (kw == 23 && vw == 34) launch<2, 2, 1, false, 64, 23, 34>(device, p, smem, stream);
    if (kw == 23 && vw == 23) launch<2, 2, 1, false, 64, 23, 23>(device, p, smem, stream);
  } else if (terms <= 1 && max_dim <= 128) {
    rows16 ? launch<1, 4, 2, true>(device, p, smem, stream) : launch<1, 4, 2, false>(device, p, smem, stream);
  } else if (terms <= 1 && max_dim <= 256) {
    rows16 ? launch<1, 8, 4, true>(device, p, smem, stream) : launch<1, 8, 4, false>(device, p, smem, stream);
  } else if (terms <= 2 && max_dim <= 128) {
    rows16 ? launch<2, 4, 2, true>(device, p, smem, stream) : launch<2, 4, 2, false>(device, p, smem, stream);
  } else if (terms <= 4 && max_dim <= 128) {
    rows16 ? launch<4, 4, 2, true>(device, p, smem, stream) : launch<4, 4, 2, false>(device, p, smem, stream);
  } else {
    throw Error(detail::concat("GPU attention: channel groups of ", max_dim,
                               " coordinates with ", terms, " terms are not supported (at most "
                               "256 coordinates for integer-bit mse codecs, 128 otherwise)"));
  }
  // The merge sees one split a block where the blocks merged their warps' states.
  if (p.premerge) p.splits /= p.premerge;
  if (warp_merges(p)) {
    launch_early(merge_warp_kernel, p, p.units * kTileRows, 32, 0, stream);
    return;
  }
  const int merge_block = merge_threads(p.splits, c.value.term_dim);
  const int phases = std::max(1, merge_block / (c.value.term_dim / 4));
  const size_t merge_smem = (size_t(phases) * c.value.term_dim + c.head_dim + p.splits) * 4;
  if (merge_smem > 48 * 1024)
    TQKV_CUDA_CHECK(cudaFuncSetAttribute(merge_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(merge_smem)));
  launch_early(merge_kernel, p, p.units * kTileRows, merge_block, merge_smem, stream);
}

// The merge of `count` partial states a row (attend_partial's layout, [count][rows][4 + d]) by
// one warp a row: M over the non-empty states (l > 0), weights 2^(m_s − M), out = Σ w_s acc_s /
// Σ w_s l_s (the split merge's arithmetic, for states already in the output space).
__global__ void __launch_bounds__(128) merge_states_kernel(const float* states, int count,
                                                            size_t rows, int d, float* out) {
  const size_t r = size_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = int(threadIdx.x % 32);
  if (r >= rows) return;
  const size_t stride = size_t(4 + d);
  float M = kNegInf;
  for (int s = 0; s < count; ++s) {
    const float* st = states + (size_t(s) * rows + r) * stride;
    if (st[1] > 0.0f) M = fmaxf(M, st[0]);
  }
  float L = 0.0f;
  for (int s = 0; s < count; ++s) {
    const float* st = states + (size_t(s) * rows + r) * stride;
    if (st[1] > 0.0f) L += exp2f(st[0] - M) * st[1];
  }
  const float invL = 1.0f / L;  // no non-empty state: inf · 0 = NaN, as the row has no answer
  for (int j = lane; j < d; j += 32) {
    float a = 0.0f;
    for (int s = 0; s < count; ++s) {
      const float* st = states + (size_t(s) * rows + r) * stride;
      if (st[1] > 0.0f) a += exp2f(st[0] - M) * st[4 + j];
    }
    out[r * size_t(d) + j] = a * invL;
  }
}

void launch_merge_states(Device device, const float* states, int count, size_t rows, int head_dim,
                         float* out, CudaStream stream) {
  DeviceGuard guard(device);
  merge_states_kernel<<<unsigned((rows + 3) / 4), 128, 0, stream>>>(states, count, rows, head_dim,
                                                                    out);
  TQKV_CUDA_CHECK_LAUNCH("merge_states_kernel");
}

}  // namespace tqkv::gpu
