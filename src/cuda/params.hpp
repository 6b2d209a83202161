// The plain structs the CUDA kernels take: device pointers and sizes, no framework types. Built
// on the host by the cache and the attention front end; shared by host code and kernels.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace tqkv::gpu {

inline constexpr int kMaxGroups = 2;      // channel groups of a codec (fractional bits: 2)
inline constexpr int kMaxLaunchBatch = 128;  // sequences per attention launch

/// One channel group of a codec on the device, and where its sections sit in a page block.
struct GroupTables {
  int dim = 0;
  int mse_bits = 0;  // 0..8 (prod: bits − 1)
  int qjl = 0;       // prod: sign bits and γ stored
  int dense = 0;     // dense rotation (else Hadamard)
  float gain = 1.0f;        // Hadamard 1/sqrt(d); dense 1
  float qjl_factor = 0.0f;  // sqrt(π/2) / d
  const float* signs = nullptr;       // Hadamard signs [dim]
  const float* rotation = nullptr;    // dense Q, row-major [dim][dim]
  const float* boundaries = nullptr;  // [2^mse_bits − 1]
  /// A code's search shortcut (append): for y's bucket b = floor(y · bucket_scale +
  /// bucket_offset), clamped to [0, kBuckets), buckets[b] is the count of boundaries below y or
  /// one less, so one comparison with a boundary finishes the count; null where the boundaries
  /// lie too close for that (codes of 5 bits and more) or are fewer than 2 (1 bit), which then
  /// take the binary search.
  const uint8_t* buckets = nullptr;
  float bucket_scale = 0.0f, bucket_offset = 0.0f;
  const float* centroids = nullptr;   // [2^mse_bits]
  const float* qjl_matrix = nullptr;  // S, row-major [dim][dim]
  /// Two 4-bit codes in a byte (low nibble first) → the float16 pair (c[low], c[high]).
  const uint32_t* code_pairs = nullptr;
  /// The same for sign bits: (±1, ±1).
  const uint32_t* sign_pairs = nullptr;
  // Sections in the block: start of the run, bytes per token.
  uint32_t codes_at = 0, codes_bytes = 0;
  uint32_t signs_at = 0, signs_bytes = 0;
  uint32_t norm_at = 0, gamma_at = 0;
};

inline constexpr int kBuckets = 64;
inline constexpr int kMaxTerms = 2 * kMaxGroups;  // per group: codes and QJL signs
/// Lanes of a warp that share one code word (8 coordinates) of a token in the attention MMAs.
inline constexpr int kKeyLanesPerWord = 4, kValueLanesPerWord = 8;

/// One term of a codec as the attention kernels read it: a group's codes, or its QJL sign bits.
/// Built on the host (make_terms), so the kernels read these from the parameter space.
struct TermTables {
  int group = 0, sign = 0, width = 0, dim = 0;
  int words = 0;     // 8-coordinate code words per token
  int per_lane = 0;  // words a lane owns (its side's lanes per word)
  uint32_t at = 0, bytes = 0;  // section in the block: start, bytes per token
  uint32_t norm_at = 0, gamma_at = 0;  // the per-token scale n (times γ for signs)
  float key_factor = 1.0f;     // keys: √(π/2)/d for signs, else 1
  int acc_offset = 0;          // where its coordinates sit in a query row / accumulator row
  /// Where a 16-token tile of its codes, norms and γ sit in an attention kernel's stage buffer.
  uint32_t stage_codes = 0, stage_norm = 0, stage_gamma = 0;
};

struct CodecTables {
  int groups = 0;
  int norm_f16 = 1;
  int center = 0;  // encodes x − offset (CacheView::offsets)
  uint32_t block_bytes = 0;
  /// Coordinates over the terms (per group: codes if any, then QJL signs): a rotated query row
  /// on the key side, a row's rotated-space accumulator on the value side.
  int term_dim = 0;
  GroupTables g[kMaxGroups];
  int n_terms = 0;
  TermTables terms[kMaxTerms];
  uint32_t stage_end = 0;  // one past this side's last byte in a stage buffer
};

/// Fills t.terms (codes then signs per group), t.term_dim and the terms' places in a stage buffer
/// (from `stage_begin`, 16-byte aligned runs) from t.g and t.norm_f16; `lanes_per_word` is the
/// side's (kKeyLanesPerWord or kValueLanesPerWord).
inline void make_terms(CodecTables& t, int lanes_per_word, uint32_t stage_begin) {
  constexpr uint32_t kTile = 16;  // tokens of a tile (every run below is a multiple of 16 bytes)
  const uint32_t nb = t.norm_f16 ? 2 : 4;
  uint32_t stage = stage_begin;
  t.n_terms = 0;
  t.term_dim = 0;
  for (int gi = 0; gi < t.groups; ++gi) {
    const GroupTables& g = t.g[gi];
    for (int sign = 0; sign < 2; ++sign) {
      if (sign == 0 && g.mse_bits == 0) continue;
      if (sign == 1 && !g.qjl) continue;
      TermTables& x = t.terms[t.n_terms++];
      x.group = gi;
      x.sign = sign;
      x.width = sign ? 1 : g.mse_bits;
      x.dim = g.dim;
      x.words = g.dim / 8;
      x.per_lane = (x.words + lanes_per_word - 1) / lanes_per_word;
      x.at = sign ? g.signs_at : g.codes_at;
      x.bytes = sign ? g.signs_bytes : g.codes_bytes;
      x.norm_at = g.norm_at;
      x.gamma_at = g.gamma_at;
      x.key_factor = sign ? g.qjl_factor : 1.0f;
      x.acc_offset = t.term_dim;
      t.term_dim += g.dim;
      x.stage_codes = stage;
      stage += kTile * x.bytes;
      x.stage_norm = stage;
      stage += kTile * nb;
      x.stage_gamma = stage;
      if (sign) stage += kTile * nb;
    }
  }
  t.stage_end = stage;
}

/// GroupTables::buckets for ascending `boundaries`: kBuckets equal buckets from the first to the
/// last, where bucket b holds the count of boundaries below bucket b − 1's start. A value whose
/// bucket is computed one off either way still has at most one boundary between that count and
/// its code as long as no three neighbouring buckets (the top two open upward) hold more than one
/// boundary; nothing where some do (the binary search then runs), and nothing for boundaries that
/// are not finite and ascending, or whose range sits so far from 0 (|offset| > 2^16) that the
/// float scale and offset could misplace a value by a bucket.
struct CodeBuckets {
  std::array<uint8_t, kBuckets> counts{};
  float scale = 0.0f, offset = 0.0f;
};

inline std::optional<CodeBuckets> code_buckets(const float* boundaries, size_t n) {
  if (n < 2 || n > 255) return std::nullopt;
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(boundaries[i]) || (i > 0 && !(boundaries[i - 1] < boundaries[i])))
      return std::nullopt;
  const double lo = boundaries[0], hi = boundaries[n - 1], width = (hi - lo) / kBuckets;
  if (!(width > 0.0) || !std::isfinite(width) || std::fabs(lo / width) > 65536.0)
    return std::nullopt;
  CodeBuckets r;
  r.scale = float(1.0 / width);
  r.offset = float(-lo / width);
  for (int b = 0; b < kBuckets; ++b) {
    const double from = lo + (b - 1) * width;
    const double to = b + 2 < kBuckets ? lo + (b + 2) * width : INFINITY;
    size_t below = 0, inside = 0;
    for (size_t i = 0; i < n; ++i) {
      below += boundaries[i] < from;
      inside += boundaries[i] >= from && boundaries[i] < to;
    }
    if (inside > 1) return std::nullopt;
    r.counts[size_t(b)] = uint8_t(below);
  }
  return r;
}

/// One layer of a GPU cache as the kernels see it.
struct CacheView {
  uint8_t* pool = nullptr;  // the layer's pages
  uint64_t layer_page_bytes = 0;
  uint32_t key_block_bytes = 0, value_block_bytes = 0;
  int page_tokens = 0, kv_heads = 0, head_dim = 0, layers = 0, layer = 0;
  int page_shift = -1;  // log2(page_tokens) when it is a power of two, else −1
  const uint32_t* page_tables = nullptr;  // [slot][page_table_stride]
  uint32_t page_table_stride = 0;
  const uint32_t* lengths = nullptr;  // [slot][layers]
  /// For each (layer, head, side) the source channel of each concatenated group channel
  /// (outlier group first): [layers][kv_heads][2][head_dim].
  const int16_t* channels = nullptr;
  /// For each (layer, head, side) the centering offset of each source channel (0 where the
  /// side does not center): [layers][kv_heads][2][head_dim].
  const float* offsets = nullptr;
  CodecTables key, value;
};

/// Quantize + append of `tokens` tokens of one layer (keys and values of every KV head).
struct AppendParams {
  CacheView cache;
  const void* k = nullptr;
  const void* v = nullptr;  // [tokens][kv_heads][head_dim]
  int type = 0;             // ScalarType: 0 f32, 1 f16, 2 bf16
  uint32_t slot = 0;
  uint64_t first_token = 0;  // position of the first new token
  uint32_t tokens = 0;
  /// Lowered (atomicMin) to (side · kv_heads + head) · tokens + token of a vector that cannot be
  /// encoded (non-finite element or norm too large), if any: it must hold 0xffffffff before. A
  /// step counts its tokens as step_base + token of step_total.
  uint32_t* first_invalid = nullptr;
  /// The device's sequence lengths ([slot][layers], CacheView::lengths): the kernel writes the
  /// new length of this layer of every sequence it appends to.
  uint32_t* lengths = nullptr;
  /// A decode step of several sequences (KVCache::append_step) instead of one sequence's tokens:
  /// token t is one token of the sequence in page-table row step_slot[t], at step_position[t].
  int step = 0;
  uint32_t step_base = 0, step_total = 0;
  uint32_t step_slot[kMaxLaunchBatch];
  uint32_t step_position[kMaxLaunchBatch];
};

/// The channel statistics that codecs calibrating on their first batch choose from
/// (Codec::calibrated_spec), for `pairs` (side, KV head) pairs of an append's input, with the
/// CPU's arithmetic: rows in order, sums in double, nothing contracted.
struct CalibrationParams {
  const void* k = nullptr;
  const void* v = nullptr;  // [tokens][kv_heads][head_dim]
  int type = 0;             // ScalarType: 0 f32, 1 f16, 2 bf16
  uint32_t tokens = 0;
  int kv_heads = 0, head_dim = 0;
  /// Per pair: side, KV head, and what to compute (kCalibrate* flags).
  const int32_t* jobs = nullptr;  // [pairs][3]
  /// [pairs][head_dim]: in, the given offsets μ (kCalibrateGivenOffset); out, the batch's
  /// offsets μ = float(Σ x / tokens) (kCalibrateOffset).
  float* offsets = nullptr;
  /// Out [pairs][head_dim] (kCalibrateEnergies): Σ (x − μ)², the differences in float (none
  /// where there is no μ), their squares summed in double.
  double* energies = nullptr;
  /// Out [pairs][head_dim]: each channel's first token with a non-finite element, or 0xffffffff.
  uint32_t* first_bad = nullptr;
};
inline constexpr int kCalibrateOffset = 1, kCalibrateGivenOffset = 2, kCalibrateEnergies = 4;

/// Fused attention over one layer for up to kMaxLaunchBatch sequences.
/// Work: units (sequence, KV head, tile of 16 query rows) × splits; a query row is
/// (query token i, query head r of the KV head's group), row ρ = i · R + r within the sequence.
struct AttentionParams {
  CacheView cache;
  const float* q = nullptr;  // [rows][q_heads][head_dim]
  float* out = nullptr;
  /// Instead of out: partial states [rows][q_heads][4 + head_dim] (attend_partial's layout).
  float* states = nullptr;
  int q_heads = 0, group = 0;
  float scale_log2 = 0;  // softmax scale · log2(e)
  uint64_t window = 0;
  int batch = 0;
  int splits = 1;      // token splits per unit; 0: fill one wave of the GPU (launch chooses)
  /// Set by the launch: warps per attention block when each block's warps take splits of one
  /// unit and merge them in shared memory before writing one state (the merge kernel then sees
  /// splits / premerge splits a unit); 0 when every warp writes its own state.
  int premerge = 0;
  uint32_t max_items = 0;   // workspace capacity (units · splits)
  uint32_t max_tokens = 0;  // longest sequence of the launch (splits beyond its tiles are idle)
  uint32_t units = 0;  // Σ_b kv_heads · tiles_b
  float* partial = nullptr;  // [units · splits][16 rows][m, l, 0, 0, value term_dim floats]
  /// Rotated, normalized query rows as float16 pairs: [unit][key term][16 rows][dim / 2], and
  /// their magnitudes [unit][4 terms][16 rows] (workspace, written by the prepare kernel).
  uint32_t* prepared = nullptr;
  uint32_t prepared_words = 0;  // per unit
  float* row_scales = nullptr;
  uint32_t slot[kMaxLaunchBatch];
  uint32_t queries[kMaxLaunchBatch];    // L_b
  uint32_t tail[kMaxLaunchBatch];       // tokens after b's last query token (chunked queries)
  uint32_t first_row[kMaxLaunchBatch];  // index of b's first query token in q / out
  uint32_t first_unit[kMaxLaunchBatch + 1];
};

inline constexpr int kTileRows = 16;

}  // namespace tqkv::gpu
