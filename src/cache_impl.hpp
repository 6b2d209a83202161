// KVCache's state, shared by the cache (src/cache.cpp) and the GPU attention front end.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda/params.hpp"
#include "tqkv/cache.hpp"

namespace tqkv {

/// Page memory of one layer: 64-byte aligned host memory, or a device allocation.
class PagePool {
 public:
  PagePool(Device device, size_t bytes);
  ~PagePool();
  PagePool(PagePool&& o) noexcept : device_(o.device_), data_(o.data_) { o.data_ = nullptr; }
  PagePool& operator=(PagePool&&) = delete;
  uint8_t* data() const { return data_; }

 private:
  Device device_;
  uint8_t* data_ = nullptr;
};

/// Page-locked host words (gpu::allocate_host): what append reads back from the device (its
/// error flags) comes by one DMA instead of a staging copy.
struct HostRelease {
  void operator()(uint32_t* p) const noexcept { gpu::release_host(p); }
};
using PinnedWords = std::unique_ptr<uint32_t[], HostRelease>;
inline PinnedWords pinned_words(size_t n) {
  return PinnedWords(static_cast<uint32_t*>(gpu::allocate_host(4 * n)));
}

/// A CUDA event (gpu::create_event), destroyed with its owner once what it marks is done.
struct EventRelease {
  void operator()(void* e) const noexcept { gpu::destroy_event(e); }
};
using GpuEvent = std::unique_ptr<void, EventRelease>;

/// Steps append_step may hold queued (StepCheck::deferred) before one is checked.
inline constexpr size_t kQueuedSteps = 64;

/// The device-side mirror of a GPU cache: codec tables, page tables, lengths, channel lists.
struct GpuMirror {
  DeviceBuffer tables;    // rotations, codebooks, code-pair tables, QJL matrices
  DeviceBuffer channels;  // int16 [layers][kv_heads][2][head_dim]
  DeviceBuffer offsets;   // float [layers][kv_heads][2][head_dim]: centering offsets (or 0)
  DeviceBuffer page_tables;  // uint32 [max_sequences][max_pages]
  DeviceBuffer lengths;      // uint32 [max_sequences][layers]
  DeviceBuffer flag;         // uint32: append's first invalid vector, 0xffffffff between appends
  PinnedWords flag_host;     // where it is read back
  /// Deferred steps: step q of the queue lowers word q as append lowers `flag` (each 0xffffffff
  /// until a refusal is reported), read back into step_flags_host once the queue is checked;
  /// `queued_done` is recorded after the last queued step (declared after the buffers, it is
  /// destroyed, and so waited for, before them).
  DeviceBuffer step_flags;
  PinnedWords step_flags_host;
  GpuEvent queued_done;
  gpu::CodecTables key, value;
  std::vector<uint32_t> free_slots;  // a stack
  CudaStream stream = nullptr;
};

struct KVCache::Impl {
  CacheConfig config;
  std::vector<Codec> key_codecs, value_codecs;  // [layer * kv_heads + head]
  BlockLayout key_layout, value_layout;
  size_t layer_page_bytes = 0;  // one page of one layer
  std::vector<PagePool> pools;  // per layer: max_pages * layer_page_bytes
  std::vector<uint32_t> free_pages;  // a stack; the lowest page numbers are taken first
  std::unique_ptr<GpuMirror> gpu;    // GPU caches only

  struct Sequence {
    std::vector<uint32_t> pages;
    std::vector<size_t> lengths;  // per layer
    uint32_t slot = 0;            // GPU caches: its row in the device page tables
  };
  std::map<SequenceId, Sequence> sequences;
  SequenceId next_id = 0;
  /// GPU caches: the steps append_step queued unchecked (StepCheck::deferred), in order, with
  /// what each did on the host: one token more in `layer` of each of `seqs`, and a page taken
  /// for those marked in `took_page`.
  struct QueuedStep {
    int layer = 0;
    std::vector<SequenceId> seqs;
    std::vector<uint8_t> took_page;
  };
  std::vector<QueuedStep> queued;

  bool on_gpu() const { return gpu != nullptr; }
  size_t codec_index(int layer, int head) const {
    return size_t(layer) * size_t(config.kv_heads) + size_t(head);
  }
  size_t block_offset(uint32_t page, int head, bool values) const {
    return size_t(page) * layer_page_bytes +
           size_t(head) * (key_layout.block_bytes + value_layout.block_bytes) +
           (values ? key_layout.block_bytes : 0);
  }
  uint8_t* block(int layer, uint32_t page, int head, bool values) const {
    return pools[size_t(layer)].data() + block_offset(page, head, values);
  }
  Sequence& find(SequenceId id, const char* what);
  const Sequence& find(SequenceId id, const char* what) const {
    return const_cast<Impl*>(this)->find(id, what);
  }
  void check_layer(int layer, const char* what) const;
  /// Writes a record (a codec's encoding of one vector) into its sections of the block of
  /// (layer, head, side) that holds token `pos` of `s` (CPU caches; the page must be taken).
  void store_record(int layer, const Sequence& s, int head, int side, size_t pos,
                    const uint8_t* record);
  void release_pages_beyond(Sequence& s);

  // GPU caches.
  void init_gpu();
  void upload_channels(int layer, int head, int side);
  void upload_pages(const Sequence& s, size_t first);  // page table entries [first, end)
  void upload_lengths(const Sequence& s);
  /// Reads append's error flag (waits for the stream) and, where a kernel lowered it, resets it
  /// to 0xffffffff for the next append.
  uint32_t read_flag();
  /// Waits for the queued steps; if one was refused, undoes it and every step after it, then
  /// throws its refusal.
  void settle();
  void zero_pages(std::span<const uint32_t> pages);
  /// The kernels' view of layer `layer`.
  gpu::CacheView view(int layer) const;
};

}  // namespace tqkv
