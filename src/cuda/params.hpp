// The plain structs the CUDA kernels take: device pointers and sizes, no framework types. Built
// on the host by the cache and the attention front end; shared by host code and kernels.
#pragma once

#include <cstddef>
#include <cstdint>

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

struct CodecTables {
  int groups = 0;
  int norm_f16 = 1;
  uint32_t block_bytes = 0;
  /// Coordinates over the terms (per group: codes if any, then QJL signs): a rotated query row
  /// on the key side, a row's rotated-space accumulator on the value side.
  int term_dim = 0;
  GroupTables g[kMaxGroups];
};

/// One layer of a GPU cache as the kernels see it.
struct CacheView {
  uint8_t* pool = nullptr;  // the layer's pages
  uint64_t layer_page_bytes = 0;
  uint32_t key_block_bytes = 0, value_block_bytes = 0;
  int page_tokens = 0, kv_heads = 0, head_dim = 0, layers = 0, layer = 0;
  const uint32_t* page_tables = nullptr;  // [slot][page_table_stride]
  uint32_t page_table_stride = 0;
  const uint32_t* lengths = nullptr;  // [slot][layers]
  /// For each (layer, head, side) the source channel of each concatenated group channel
  /// (outlier group first): [layers][kv_heads][2][head_dim].
  const int16_t* channels = nullptr;
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
  /// Out: the smallest (side · kv_heads + head) · tokens + token of a vector that cannot be
  /// encoded (non-finite element or norm too large), or 0xffffffff.
  uint32_t* first_invalid = nullptr;
};

/// Fused attention over one layer for up to kMaxLaunchBatch sequences.
/// Work: units (sequence, KV head, tile of 16 query rows) × splits; a query row is
/// (query token i, query head r of the KV head's group), row ρ = i · R + r within the sequence.
struct AttentionParams {
  CacheView cache;
  const float* q = nullptr;  // [rows][q_heads][head_dim]
  float* out = nullptr;
  int q_heads = 0, group = 0;
  float scale_log2 = 0;  // softmax scale · log2(e)
  uint64_t window = 0;
  int batch = 0;
  int splits = 1;      // token splits per unit; 0: fill one wave of the GPU (launch chooses)
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
