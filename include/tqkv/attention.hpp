// Attention on the compressed cache (SPEC §2), on the CPU and (below) on the GPU.
//
// Shapes (row-major): H_q query heads, H_kv = cache.config().kv_heads, R = H_q / H_kv (GQA; query
// head h reads KV head ⌊h / R⌋), d = head_dim. A batch of sequences b = 0..B−1 contributes L_b
// query tokens each: the *last* L_b tokens stored at that layer (append K/V first, then attend).
// q and out are [Σ_b L_b, H_q, d], sequence by sequence. Query token i of sequence b sits at
// position p = T_b − L_b + i and attends causally to tokens 0..p (or the last `window` of them).
//
// How the fused path computes (never rebuilding K or V):
//   q' = Π_K(scale · q) once per query row and key channel group (+ S q' for prod keys);
//   s_t = Σ_groups n_t (⟨q', c[idx_t]⟩ + √(π/2)/d_g · γ_t ⟨S q', z_t⟩);
//   online softmax over pages of tokens, split over token ranges into mergeable states
//   (softmax_state.hpp); a = Σ_t p_t n_t c[idx_t] (+ Σ_t p_t n_t γ_t z_t for prod values) in the
//   value codec's rotated space; out = Π_Vᵀ(a / l) (+ √(π/2)/d_g · Sᵀ(·)) once per query row.
// Each KV head's codes are read once for all R query heads (and all query tokens of a tile).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "tqkv/cache.hpp"

namespace tqkv {

struct AttentionOptions {
  /// Softmax scale; 0 means 1/sqrt(head_dim).
  float scale = 0.0f;
  /// Attend only to the last `window` tokens up to and including the query's position; 0: all.
  size_t window = 0;
  /// Token-range splits per (sequence, KV head, query tile); 0 chooses from the thread count.
  int splits = 0;
};

/// Fused attention from the codes: decode (every L_b = 1) and prefill / chunked prefill.
/// Throws tqkv::Error on bad shapes, unknown sequences, L_b > T_b, H_q not a multiple of H_kv,
/// non-finite queries or a bad scale; `out` is untouched then.
void attend(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
            std::span<const size_t> query_tokens, const float* q, int q_heads, float* out,
            const AttentionOptions& options = {});

/// Decode: one query token per sequence; q and out are [B, H_q, d].
void attend_decode(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                   const float* q, int q_heads, float* out, const AttentionOptions& options = {});

// --- Partial states: attention over a share of each sequence's tokens ------------------------------
// For a cache that holds one share of each sequence (a shard of a ShardedCache, sharded.hpp),
// decode gives per query row a mergeable softmax state instead of an output:
//     row (b, head) of `states` = [m, l, 0, 0, l · o_1 .. l · o_d]      (4 + d floats)
// where, over the cache's tokens t of sequence b, s_t = scale · log2(e) · ⟨q, k_t⟩ (log2 units),
// m = max_t s_t, l = Σ_t 2^(s_t − m) and o is the attention output over those tokens (original
// space, centering offsets included). A sequence the cache holds no token of gets the empty state
// [0, 0, 0, 0, 0 ..]: l = 0 marks it (m is then ignored). States of disjoint token sets of the
// same queries merge exactly (merge_partial_states), whatever codecs each cache chose.

/// Decode partial states (every sequence has one query token; q is [B, H_q, d], states
/// [B, H_q, 4 + d]). Sequences may hold no tokens. options.window is refused: a share does not
/// know its tokens' positions in the sequence. Throws tqkv::Error; `states` is untouched then.
void attend_partial(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                    const float* q, int q_heads, float* states,
                    const AttentionOptions& options = {});

/// out[r] = the attention output of row r merged over the S state arrays (each [rows, 4 + d],
/// host memory): o = Σ_s 2^(m_s − M) l_s o_s / Σ_s 2^(m_s − M) l_s over the non-empty states,
/// M their largest m (the split-KV merge of softmax_state.hpp). Every row needs a non-empty state.
void merge_partial_states(std::span<const float* const> states, size_t rows, int head_dim,
                          float* out);

/// The reference: every key and value dequantized (Codec::decode) and attention in float64.
/// Same arguments and semantics as attend().
void attend_reference(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                      std::span<const size_t> query_tokens, const float* q, int q_heads,
                      float* out, const AttentionOptions& options = {});

/// One sequence's uncompressed keys and values, [H_kv, T, d] float32 each.
struct DenseKV {
  const float* k = nullptr;
  const float* v = nullptr;
  size_t tokens = 0;
};

/// Decode attention over uncompressed float32 K/V (the baseline an uncompressed cache gives),
/// with the same threading, splitting and softmax as the fused path. q, out: [B, H_q, d].
void attend_dense(std::span<const DenseKV> seqs, int kv_heads, int head_dim, const float* q,
                  int q_heads, float* out, const AttentionOptions& options = {});

/// The dequantize-then-attend fallback: decode each sequence's keys and values to float32
/// (Codec::decode), then attend_dense. What the fused path is measured against. `workspace`
/// keeps the dequantized keys and values between calls (grown as needed), as an engine would,
/// so that repeated calls cost dequantization and attention rather than fresh memory.
void attend_dequantized(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                        const float* q, int q_heads, float* out, std::vector<float>& workspace,
                        const AttentionOptions& options = {});
/// The same with a workspace of its own.
void attend_dequantized(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                        const float* q, int q_heads, float* out,
                        const AttentionOptions& options = {});

// --- GPU ------------------------------------------------------------------------------------------
// For a cache on a GPU: q and out are device memory ([Σ_b L_b, H_q, d] float32), the work is
// queued on `stream` (the cache's stream if nullptr is passed and the cache has one) and the call
// returns without waiting. It reads page tables and lengths from the device, allocates nothing
// and never synchronizes, so a decode step can be captured in a CUDA graph; a replay sees the
// tokens appended since (the split count chosen at capture stays). Codes of 1..4 bits (mse, or
// prod up to 5 bits), channel groups of up to 256 coordinates (128 for prod and fractional bits).
// A non-finite query gives non-finite outputs (the GPU path does not inspect q).

/// Device memory for GPU attention's partial softmax states, sized once for a cache. Calls that
/// share a workspace must be ordered (one stream, or events): each launch uses all of it.
class GpuWorkspace {
 public:
  explicit GpuWorkspace(const KVCache& cache);
  Device device() const { return buffer_.device(); }
  size_t bytes() const { return buffer_.bytes(); }
  /// Work items (sequence, KV head, 16 query rows, token split) one launch can hold.
  size_t items() const { return items_; }
  float* data() const { return buffer_.as<float>(); }

 private:
  DeviceBuffer buffer_;
  size_t items_ = 0;
};

void attend(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
            std::span<const size_t> query_tokens, const float* q, int q_heads, float* out,
            GpuWorkspace& workspace, CudaStream stream, const AttentionOptions& options = {});

void attend_decode(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                   const float* q, int q_heads, float* out, GpuWorkspace& workspace,
                   CudaStream stream, const AttentionOptions& options = {});

/// attend_partial for a cache on a GPU: q and states in its device memory (states 16-byte
/// aligned), queued on `stream`.
void attend_partial(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                    const float* q, int q_heads, float* states, GpuWorkspace& workspace,
                    CudaStream stream, const AttentionOptions& options = {});

/// merge_partial_states on a GPU: `states` is [S][rows][4 + d] in device memory (the ranks'
/// states one after another, as an all-gather leaves them), out [rows][d]; queued on `stream`.
void merge_partial_states(Device device, const float* states, int count, size_t rows,
                          int head_dim, float* out, CudaStream stream);

}  // namespace tqkv
