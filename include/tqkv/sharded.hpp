// A KV cache spread over several devices of one host: each shard is a KVCache of its own.
//
// Sequence placement: shard r holds tokens [r·S, (r+1)·S) of every sequence, the last shard also
// every token past (world − 1)·S. S is config.share_tokens, or, where that is 0, is chosen per
// sequence at its first append: that append is shared out evenly in whole pages, and later tokens
// (decode) fill the shares in order, so they go to the last shard once the first append filled
// the others. A decode step computes on every shard the partial softmax state
// of its tokens (attend_partial), gathers all shards' states on every shard with one collective
// per layer and step (an NCCL all-gather for GPU shards; CPU shards share the host's memory, so
// the merge reads their states in place), and merges them (merge_partial_states). Contexts and batches then reach the sum of the shards' memory.
//
// Head placement: shard r holds the KV heads heads_of(r) (contiguous, as even as they divide) of
// every token, and decode needs no communication: shard r takes its query heads' rows.
//
// CPU shards simulate ranks in one process (every shard on Device::cpu()): the same placement,
// states and merge as GPU shards, testable without a GPU. GPU shards are distinct GPUs, one
// process driving them all through NCCL communicators made from one unique id (NVLink SHARP /
// multicast is switched off: NCCL_NVLS_ENABLE=0 unless the environment already says otherwise).
//
// Codes: integer-bit codecs are the same on every shard (one seed), so every token is stored
// exactly as a single cache would store it, and the sharded decode equals the single-cache decode
// within the merge's float rounding. Codecs that calibrate on their first batch (fractional bits
// without outlier channels given, centering without an offset given) calibrate per shard: each
// (shard, layer, head) on the first tokens it receives; with sequence placement that is the
// shard's share, not the whole first append.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "tqkv/attention.hpp"
#include "tqkv/cache.hpp"

namespace tqkv {

enum class Placement : uint8_t { sequence, heads };

struct ShardedConfig {
  /// Each shard's configuration: kv_heads counts every KV head (head placement gives each shard
  /// its range); max_pages and max_sequences are per shard; device is ignored (devices below).
  CacheConfig cache;
  /// One shard per device: all Device::cpu() (simulated ranks) or distinct GPUs.
  std::vector<Device> devices;
  Placement placement = Placement::sequence;
  /// Sequence placement: tokens of a sequence on each shard before the next one takes over (a
  /// multiple of cache.page_tokens); 0: chosen per sequence at its first append (see above).
  size_t share_tokens = 0;
};

class ShardedCache {
 public:
  /// Validates the configuration (devices, placement, share) and creates the shards (and, for
  /// GPU shards, the NCCL communicators). Throws tqkv::Error naming what is wrong.
  explicit ShardedCache(ShardedConfig config);
  ~ShardedCache();
  ShardedCache(ShardedCache&&) noexcept;
  ShardedCache& operator=(ShardedCache&&) noexcept;

  const ShardedConfig& config() const;
  int world() const;
  KVCache& shard(int rank);
  const KVCache& shard(int rank) const;

  struct Range {
    size_t first = 0, count = 0;
  };
  /// Head placement: the KV heads shard `rank` holds; sequence placement: all of them.
  Range heads_of(int rank) const;
  /// Sequence placement: the tokens [first, first + count) of `seq` at `layer` that shard `rank`
  /// holds; head placement: all of them.
  Range tokens_of(int rank, SequenceId seq, int layer = 0) const;

  /// A new, empty sequence (the same id on every shard).
  SequenceId add_sequence();
  /// Appends `tokens` tokens to layer `layer` of `seq`. k[r] and v[r] are the same input,
  /// [tokens, kv_heads, head_dim] of `type`, in shard r's memory (as each device's model replica
  /// computes it; CPU shards may all pass one pointer); each shard stores its part. Throws on an
  /// unknown sequence or layer, a wrong number of pointers, too few free pages on a shard
  /// (checked first: nothing stored) or bad input (the shards that took their part already drop
  /// it again; a codec that calibrated on it keeps its choice).
  void append(SequenceId seq, int layer, std::span<const void* const> k,
              std::span<const void* const> v, size_t tokens, ScalarType type = ScalarType::f32);
  /// One decode step: a token to layer `layer` of each of `seqs` (distinct), as
  /// KVCache::append_step. k[r] and v[r] are the same input, [seqs.size(), kv_heads, head_dim]
  /// of `type`, in shard r's memory; each shard takes its sequences' rows (sequence placement:
  /// those whose token falls in its share) or its heads of every row (head placement) in one
  /// append_step. Throws as append does (on bad input the shards that took their rows already
  /// drop them again).
  void append_step(int layer, std::span<const SequenceId> seqs, std::span<const void* const> k,
                   std::span<const void* const> v, ScalarType type = ScalarType::f32);
  /// Tokens stored for `seq` at `layer` over all shards.
  size_t length(SequenceId seq, int layer = 0) const;
  bool contains(SequenceId seq) const;
  void free_sequence(SequenceId seq);

  /// Decode on every shard: q[r] and out[r] in shard r's memory. Sequence placement: q[r] is
  /// [B, H_q, d] (the same on every shard) and out[r] receives the whole output [B, H_q, d].
  /// Head placement: q[r] and out[r] are [B, H_q · heads_of(r).count / kv_heads, d], the shard's
  /// query heads (query head h reads KV head ⌊h / R⌋ as in attend). GPU shards: queued on each
  /// shard's stream (KVCache::set_stream), returns without waiting; the states' buffers grow at
  /// a call with more rows than before (size them with a first call before capturing a graph).
  void attend_decode(int layer, std::span<const SequenceId> seqs, std::span<const float* const> q,
                     int q_heads, std::span<float* const> out,
                     const AttentionOptions& options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tqkv
