// The compressed, paged KV cache (SPEC §3).
//
// Tokens live in fixed-size pages of `page_tokens` tokens taken from a pool; each sequence has a
// page table (its pages in token order), so a sequence grows by whole pages without moving what
// is stored, and sequences of any lengths share the pool. A page number addresses the same slot
// in every layer; each layer keeps its own length per sequence because a forward pass appends
// layer by layer.
//
// Page layout. Layer l's pool is an array of pages; page p of layer l holds, for each KV head h
// in order, a key block then a value block:
//     page  = [K block h=0][V block h=0][K block h=1][V block h=1] ...
// A block stores the codec records (codec.hpp) of its P = page_tokens tokens transposed by
// section: the record's sections are, per channel group g, the packed MSE codes, the QJL sign
// bits (prod), the norm and γ (prod). Section s of token t is at
//     block + section_offset[s] + t * section_bytes[s]
// so the codes of consecutive tokens are contiguous (one run per section, read as a stream by the
// attention kernels) and norms form their own small array. Every section and every block starts
// on a 64-byte boundary (zero padding), so wide aligned loads never straddle a section. A stored
// token's sections are byte-identical to the record Codec::encode produced for it.
//
// Codecs. One key codec and one value codec per (layer, KV head). With integer bits they are all
// the same codec (same seed: one rotation, one codebook). With fractional bits and no outlier
// channels given, or with centering codecs (CodecSpec::center) and no offset given, each
// (layer, head) chooses its own channels and offset from the first tokens appended to it (append
// a prefill in one call: a first append of one token gives a poor offset); the choice is saved
// with the cache.
//
// GPU caches. With config.device = Device::cuda(i) the pages live in plain device allocations and
// append takes device pointers; keys and values are quantized on the GPU (src/cuda/append.cu)
// into codes bit-identical to the CPU's. Page tables and lengths are mirrored on the device so
// that GPU attention reads them without the host. GPU work runs on the cache's stream
// (set_stream); append waits for it (it reports bad input). to() copies a cache between devices.
//
// Every mutating call validates everything first and changes nothing when it throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "tqkv/codec.hpp"
#include "tqkv/device.hpp"

namespace tqkv {

struct CacheConfig {
  int layers = 1;
  int kv_heads = 1;
  int head_dim = 128;
  /// Key and value codecs; their `dim` is ignored (set to head_dim). Default: 4-bit MSE,
  /// automatic rotation (Hadamard where the dimension allows).
  CodecSpec key;
  CodecSpec value;
  /// Tokens per page: a multiple of 8 in 8..1024.
  int page_tokens = 32;
  /// Pages in the pool (each holds page_tokens tokens of every layer).
  size_t max_pages = 1024;
  /// Where the pages live.
  Device device;
  /// GPU caches: sequences alive at once (sizes the device page tables, max_pages entries each).
  size_t max_sequences = 64;

  /// The pages needed to hold `tokens` tokens of every sequence in `lengths`.
  size_t pages_for(std::span<const size_t> lengths) const;
};

using SequenceId = uint64_t;

/// When KVCache::append_step on a GPU cache reports input it refuses (CPU caches always check
/// at once).
enum class StepCheck {
  now,      ///< waits for the step's kernel and throws before returning
  deferred  ///< returns once the step is queued (no wait); see append_step
};

/// Where a section of the codec record sits in a page block.
struct SectionLayout {
  size_t record_offset = 0;  ///< in the codec record
  size_t bytes = 0;          ///< per token
  size_t block_offset = 0;   ///< in the block (its run holds page_tokens * bytes)
};

/// The layout of one codec's block in a page.
struct BlockLayout {
  /// Per channel group: codes, signs, norm, gamma (bytes = 0 where a group has none).
  struct Group {
    SectionLayout codes, signs, norm, gamma;
  };
  std::vector<Group> groups;
  size_t record_bytes = 0;
  size_t block_bytes = 0;  ///< a multiple of 64
};

class KVCache {
 public:
  /// Validates the configuration (head_dim, bits, page size, pool size) and allocates the pool.
  /// Throws tqkv::Error naming the offending field.
  explicit KVCache(const CacheConfig& config);
  ~KVCache();
  KVCache(KVCache&&) noexcept;
  KVCache& operator=(KVCache&&) noexcept;

  const CacheConfig& config() const;
  Device device() const { return config().device; }
  /// GPU caches: the CUDA stream that append and copies run on (default: nullptr).
  void set_stream(CudaStream stream);
  CudaStream stream() const;
  /// A copy of this cache (codecs, sequences, codes) on `device`.
  KVCache to(Device device) const;

  // --- sequences -------------------------------------------------------------------------------
  /// A new, empty sequence.
  SequenceId add_sequence();
  /// Appends `tokens` tokens to layer `layer` of sequence `seq`: k and v are
  /// [tokens, kv_heads, head_dim] (row-major) of `type`, in the cache's device memory. Quantizes
  /// on write. The codes do not
  /// depend on how a sequence's tokens are split into appends. Throws (changing nothing) on an
  /// unknown sequence or layer, NaN/Inf input, or when the pool has too few free pages.
  void append(SequenceId seq, int layer, const void* k, const void* v, size_t tokens,
              ScalarType type = ScalarType::f32);
  void append(SequenceId seq, int layer, const float* k, const float* v, size_t tokens) {
    append(seq, layer, k, v, tokens, ScalarType::f32);
  }
  /// One decode step of several sequences: appends one token to layer `layer` of each of `seqs`
  /// (distinct); k and v are [seqs.size(), kv_heads, head_dim] (row i: seqs[i]'s token) of
  /// `type`, in the cache's device memory. The same codes as appending each token with append;
  /// on a GPU cache one launch (up to 128 sequences a launch) and one wait for the whole step,
  /// instead of one of each a sequence. The layer's codecs must be ready (a calibrating codec
  /// chooses from a sequence's first append, its prefill). Throws (changing nothing) on an
  /// unknown or repeated sequence, NaN/Inf input (naming the first bad vector in (keys, values;
  /// head; sequence) order), or when the pool has too few free pages.
  ///
  /// With StepCheck::deferred a GPU cache returns as soon as the step is queued on its stream,
  /// so that a decode loop does not wait for each layer's append; k and v must stay valid until
  /// the step has run (until check(), or anything that waits for the stream). Deferred steps
  /// are checked together by check(), by the next call that changes the sequences (a checked
  /// append_step, append, truncate, truncate_layer, free_sequence, set_stream) or copies them
  /// (serialize, save, to), or when 64 are queued: a refusal among them is thrown there, after
  /// undoing the refused step and every step queued after it, so that the cache holds what it
  /// held before the refused step. Until then the cache reads as if the queued steps were taken
  /// (length, page_table, read_records, attention), refused or not; a cache destroyed with
  /// steps queued reports nothing.
  void append_step(int layer, std::span<const SequenceId> seqs, const void* k, const void* v,
                   ScalarType type = ScalarType::f32, StepCheck check = StepCheck::now);
  /// Waits for the steps queued with StepCheck::deferred and throws if one was refused (see
  /// append_step); does nothing otherwise, and on CPU caches.
  void check();
  /// Removes the last `tokens` tokens of every layer of `seq` (rollback); frees emptied pages.
  void truncate(SequenceId seq, size_t tokens);
  /// The same for one layer (undoes that layer's last append of `tokens` tokens).
  void truncate_layer(SequenceId seq, int layer, size_t tokens);
  /// Removes the sequence and returns its pages to the pool.
  void free_sequence(SequenceId seq);
  bool contains(SequenceId seq) const;
  /// Tokens stored for `seq` at `layer`.
  size_t length(SequenceId seq, int layer = 0) const;
  /// All sequences, in creation order.
  std::vector<SequenceId> sequences() const;

  // --- memory ----------------------------------------------------------------------------------
  /// Bytes one token occupies in one layer: kv_heads * (key record + value record).
  size_t bytes_per_token_per_layer() const;
  /// Bytes one token occupies in all layers.
  size_t bytes_per_token() const;
  /// The same token in float16 (2 * kv_heads * head_dim * 2 bytes per layer), for ratios.
  size_t fp16_bytes_per_token() const;
  /// Bytes of one page (all layers), including alignment padding.
  size_t page_bytes() const;
  size_t pages_total() const;
  size_t pages_free() const;
  /// Sum over sequences and layers of stored tokens * bytes_per_token_per_layer().
  size_t stored_bytes() const;
  /// Bytes of the pages in use (what the stored tokens occupy, with page and alignment slack).
  size_t used_page_bytes() const;

  // --- codecs and raw access (for attention backends) -------------------------------------------
  const Codec& key_codec(int layer, int head) const;
  const Codec& value_codec(int layer, int head) const;
  const BlockLayout& key_layout() const;
  const BlockLayout& value_layout() const;
  /// The page table of `seq` (page numbers in token order).
  std::span<const uint32_t> page_table(SequenceId seq) const;
  /// The key / value block of KV head `head` in page `page` of layer `layer` (device memory for
  /// a GPU cache).
  const uint8_t* key_block(int layer, uint32_t page, int head) const;
  const uint8_t* value_block(int layer, uint32_t page, int head) const;
  /// Copies the codec records of tokens [first, first + count) of (seq, layer, head) into
  /// `records` (count * record_bytes, host memory): what Codec::decode reads.
  void read_records(SequenceId seq, int layer, int head, bool values, size_t first, size_t count,
                    uint8_t* records) const;

  // --- files -----------------------------------------------------------------------------------
  /// Saves configuration, codecs (with seeds, outlier channels, offsets), sequences and pages to
  /// a .tqkv file (kind 2), checksummed. Sequence ids are kept.
  void save(const std::filesystem::path& path) const;
  std::vector<uint8_t> serialize() const;
  /// Loads a saved cache; truncated or corrupted files give a clear error. `max_pages`, if
  /// nonzero, sizes the pool (at least the pages the file needs); 0 keeps the saved pool size.
  /// `device` says where the loaded cache lives.
  static KVCache load(const std::filesystem::path& path, size_t max_pages = 0,
                      Device device = Device::cpu());
  static KVCache parse(std::span<const uint8_t> bytes, std::string_view name,
                       size_t max_pages = 0, Device device = Device::cpu());

  struct Impl;
  /// The implementation, for tqkv's own backends (src/cache_impl.hpp).
  const Impl& internals() const { return *impl_; }

 private:
  explicit KVCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tqkv
