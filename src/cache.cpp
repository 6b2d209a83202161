#include "tqkv/cache.hpp"

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>

#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"
#include "tqkv/file.hpp"
#include "tqkv/half.hpp"

namespace tqkv {

namespace {

constexpr size_t kAlign = 64;
constexpr size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Page memory: 64-byte aligned, not zeroed up front (a page is zeroed when it is taken).
struct AlignedFree {
  void operator()(uint8_t* p) const { std::free(p); }
};
using PoolPtr = std::unique_ptr<uint8_t, AlignedFree>;

PoolPtr allocate_pool(size_t bytes) {
  if (bytes == 0) return PoolPtr(nullptr);
  void* p = std::aligned_alloc(kAlign, align_up(bytes));
  TQKV_CHECK(p != nullptr, "KV cache: cannot allocate ", bytes, " bytes for the page pool");
  return PoolPtr(static_cast<uint8_t*>(p));
}

BlockLayout make_layout(const Codec& codec, int page_tokens) {
  // groups() describes sizes and record offsets even before outlier channels are chosen.
  BlockLayout layout;
  layout.record_bytes = codec.record_bytes();
  size_t at = 0;
  auto place = [&](size_t record_offset, size_t bytes) {
    SectionLayout s{record_offset, bytes, 0};
    if (bytes > 0) {
      s.block_offset = at;
      at = align_up(at + bytes * size_t(page_tokens));
    }
    return s;
  };
  for (const ChannelGroup& g : codec.groups()) {
    BlockLayout::Group lg;
    lg.codes = place(g.codes_offset, g.signs_offset - g.codes_offset);
    lg.signs = place(g.signs_offset, g.norm_offset - g.signs_offset);
    lg.norm = place(g.norm_offset, g.gamma_offset - g.norm_offset);
    lg.gamma = place(g.gamma_offset, g.offset + g.bytes - g.gamma_offset);
    layout.groups.push_back(lg);
  }
  layout.block_bytes = at;
  return layout;
}

template <class Fn>
void for_each_section(const BlockLayout& layout, Fn&& fn) {
  for (const auto& g : layout.groups)
    for (const SectionLayout* s : {&g.codes, &g.signs, &g.norm, &g.gamma})
      if (s->bytes > 0) fn(*s);
}

}  // namespace

size_t CacheConfig::pages_for(std::span<const size_t> lengths) const {
  TQKV_CHECK(page_tokens > 0, "CacheConfig::pages_for: page_tokens must be positive");
  size_t pages = 0;
  for (size_t n : lengths) pages += (n + size_t(page_tokens) - 1) / size_t(page_tokens);
  return pages;
}

struct KVCache::Impl {
  CacheConfig config;
  std::vector<Codec> key_codecs, value_codecs;  // [layer * kv_heads + head]
  BlockLayout key_layout, value_layout;
  size_t layer_page_bytes = 0;  // one page of one layer
  std::vector<PoolPtr> pools;   // per layer: max_pages * layer_page_bytes
  std::vector<uint32_t> free_pages;  // a stack; the lowest page numbers are taken first

  struct Sequence {
    std::vector<uint32_t> pages;
    std::vector<size_t> lengths;  // per layer
  };
  std::map<SequenceId, Sequence> sequences;
  SequenceId next_id = 0;

  size_t codec_index(int layer, int head) const {
    return size_t(layer) * size_t(config.kv_heads) + size_t(head);
  }
  uint8_t* block(int layer, uint32_t page, int head, bool values) const {
    return pools[size_t(layer)].get() + size_t(page) * layer_page_bytes +
           size_t(head) * (key_layout.block_bytes + value_layout.block_bytes) +
           (values ? key_layout.block_bytes : 0);
  }
  Sequence& find(SequenceId id, const char* what) {
    auto it = sequences.find(id);
    TQKV_CHECK(it != sequences.end(), what, ": sequence ", id, " does not exist");
    return it->second;
  }
  const Sequence& find(SequenceId id, const char* what) const {
    return const_cast<Impl*>(this)->find(id, what);
  }
  void check_layer(int layer, const char* what) const {
    TQKV_CHECK(layer >= 0 && layer < config.layers, what, ": layer ", layer, " is outside 0..",
               config.layers - 1);
  }
  void release_pages_beyond(Sequence& s) {
    const size_t longest = *std::max_element(s.lengths.begin(), s.lengths.end());
    const size_t keep = (longest + size_t(config.page_tokens) - 1) / size_t(config.page_tokens);
    while (s.pages.size() > keep) {
      free_pages.push_back(s.pages.back());
      s.pages.pop_back();
    }
  }
};

KVCache::KVCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KVCache::~KVCache() = default;
KVCache::KVCache(KVCache&&) noexcept = default;
KVCache& KVCache::operator=(KVCache&&) noexcept = default;

KVCache::KVCache(const CacheConfig& config) : impl_(std::make_unique<Impl>()) {
  auto& im = *impl_;
  im.config = config;
  CacheConfig& c = im.config;
  TQKV_CHECK(c.layers >= 1 && c.layers <= 4096, "KV cache: layers must be in 1..4096, got ",
             c.layers);
  TQKV_CHECK(c.kv_heads >= 1 && c.kv_heads <= 4096, "KV cache: kv_heads must be in 1..4096, got ",
             c.kv_heads);
  TQKV_CHECK(c.head_dim >= 8 && c.head_dim <= 4096 && c.head_dim % 8 == 0,
             "KV cache: head_dim must be a multiple of 8 in 8..4096, got ", c.head_dim);
  TQKV_CHECK(c.page_tokens >= 8 && c.page_tokens <= 1024 && c.page_tokens % 8 == 0,
             "KV cache: page_tokens must be a multiple of 8 in 8..1024, got ", c.page_tokens);
  TQKV_CHECK(c.max_pages <= (size_t(1) << 31), "KV cache: max_pages ", c.max_pages,
             " is above the supported 2^31");
  c.key.dim = c.head_dim;
  c.value.dim = c.head_dim;
  for (const CodecSpec* spec : {&c.key, &c.value}) {
    const char* side = spec == &c.key ? "key" : "value";
    std::optional<Codec> codec;
    try {
      codec.emplace(*spec);
    } catch (const Error& e) {
      throw Error(detail::concat("KV cache: ", side, " codec: ", e.what()));
    }
    // The attention kernels read codes 8 coordinates at a time.
    for (const ChannelGroup& g : codec->groups())
      TQKV_CHECK(g.dim % 8 == 0, "KV cache: ", side, " codec: ", spec->bits, " bits at head_dim ",
                 c.head_dim, " gives a channel group of ", g.dim,
                 " channels; attention needs multiples of 8");
    auto& codecs = spec == &c.key ? im.key_codecs : im.value_codecs;
    auto& layout = spec == &c.key ? im.key_layout : im.value_layout;
    layout = make_layout(*codec, c.page_tokens);
    const size_t n = size_t(c.layers) * size_t(c.kv_heads);
    codecs.reserve(n);
    for (size_t i = 0; i < n; ++i) codecs.push_back(codec->ready() ? *codec : Codec(*spec));
  }
  im.layer_page_bytes =
      size_t(c.kv_heads) * (im.key_layout.block_bytes + im.value_layout.block_bytes);
  TQKV_CHECK(c.max_pages == 0 || im.layer_page_bytes <= (size_t(1) << 40) / c.max_pages,
             "KV cache: a pool of ", c.max_pages, " pages of ", im.layer_page_bytes * c.layers,
             " bytes is larger than 1 TiB");
  for (int l = 0; l < c.layers; ++l)
    im.pools.push_back(allocate_pool(c.max_pages * im.layer_page_bytes));
  im.free_pages.resize(c.max_pages);
  for (size_t i = 0; i < c.max_pages; ++i) im.free_pages[i] = uint32_t(c.max_pages - 1 - i);
}

const CacheConfig& KVCache::config() const { return impl_->config; }

SequenceId KVCache::add_sequence() {
  auto& im = *impl_;
  const SequenceId id = im.next_id++;
  im.sequences[id] = Impl::Sequence{{}, std::vector<size_t>(size_t(im.config.layers), 0)};
  return id;
}

bool KVCache::contains(SequenceId seq) const { return impl_->sequences.count(seq) > 0; }

size_t KVCache::length(SequenceId seq, int layer) const {
  impl_->check_layer(layer, "length");
  return impl_->find(seq, "length").lengths[size_t(layer)];
}

std::vector<SequenceId> KVCache::sequences() const {
  std::vector<SequenceId> ids;
  for (const auto& [id, s] : impl_->sequences) ids.push_back(id);
  return ids;
}

void KVCache::append(SequenceId seq, int layer, const void* k, const void* v, size_t tokens,
                     ScalarType type) {
  auto& im = *impl_;
  const CacheConfig& c = im.config;
  im.check_layer(layer, "append");
  Impl::Sequence& s = im.find(seq, "append");
  if (tokens == 0) return;
  TQKV_CHECK(k != nullptr && v != nullptr, "append: null key or value pointer");
  const size_t P = size_t(c.page_tokens);
  const size_t old_len = s.lengths[size_t(layer)];
  const size_t new_len = old_len + tokens;
  const size_t pages_needed = (new_len + P - 1) / P;
  const size_t extra = pages_needed > s.pages.size() ? pages_needed - s.pages.size() : 0;
  TQKV_CHECK(extra <= im.free_pages.size(), "append: out of pages: ", tokens,
             " more tokens for sequence ", seq, " need ", extra, " new pages, but only ",
             im.free_pages.size(), " of ", c.max_pages, " are free");

  // Encode everything first (this validates the input); fractional codecs that have no channels
  // yet get candidates that are only installed once every head has encoded.
  const size_t H = size_t(c.kv_heads), d = size_t(c.head_dim);
  const size_t elem = type == ScalarType::f32 ? 4 : 2;
  std::vector<std::vector<uint8_t>> records(2 * H);
  struct Calibrated {
    int side;
    size_t head;
    Codec codec;
  };
  std::vector<Calibrated> calibrated;
  std::vector<float> head_rows;
  std::vector<uint8_t> head_raw(tokens * d * elem);
  for (int side = 0; side < 2; ++side) {
    const auto* src = static_cast<const uint8_t*>(side == 0 ? k : v);
    const auto& codecs = side == 0 ? im.key_codecs : im.value_codecs;
    const auto where = [&](size_t h) {
      return detail::concat("append: sequence ", seq, ", layer ", layer, ", ",
                            side == 0 ? "keys" : "values", " of KV head ", h, ": ");
    };
    for (size_t h = 0; h < H; ++h) {
      // Gather head h's rows [tokens, d] out of [tokens, H, d].
      for (size_t t = 0; t < tokens; ++t)
        std::memcpy(&head_raw[t * d * elem], src + (t * H + h) * d * elem, d * elem);
      Codec codec = codecs[im.codec_index(layer, int(h))];
      if (!codec.ready()) {
        // Choose this head's outlier channels on a private codec, installed only on success.
        head_rows.resize(tokens * d);
        for (size_t i = 0; i < tokens * d; ++i) {
          uint16_t half = 0;
          if (type == ScalarType::f32) {
            std::memcpy(&head_rows[i], &head_raw[i * 4], 4);
          } else {
            std::memcpy(&half, &head_raw[i * 2], 2);
            head_rows[i] = type == ScalarType::f16 ? half_to_float(half) : bf16_to_float(half);
          }
          TQKV_CHECK(std::isfinite(head_rows[i]), where(h), "token ", i / d,
                     " has a non-finite element (", head_rows[i], " at index ", i % d, ")");
        }
        CodecSpec spec = codec.spec();
        spec.outlier_channels = codec.select_outlier_channels(head_rows.data(), tokens);
        codec = Codec(spec);
        calibrated.push_back({side, h, codec});
      }
      auto& out = records[size_t(side) * H + h];
      out.resize(tokens * codec.record_bytes());
      try {
        codec.encode(head_raw.data(), type, tokens, out.data());
      } catch (const Error& e) {
        throw Error(where(h) + e.what());
      }
    }
  }

  // Commit: install newly calibrated codecs, take pages, scatter records into them.
  for (const Calibrated& c2 : calibrated)
    (c2.side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(c2.head))] =
        c2.codec;
  for (size_t i = 0; i < extra; ++i) {
    const uint32_t page = im.free_pages.back();
    im.free_pages.pop_back();
    for (int l = 0; l < c.layers; ++l)
      std::memset(im.pools[size_t(l)].get() + size_t(page) * im.layer_page_bytes, 0,
                  im.layer_page_bytes);
    s.pages.push_back(page);
  }
  for (int side = 0; side < 2; ++side) {
    const BlockLayout& layout = side == 0 ? im.key_layout : im.value_layout;
    for (size_t h = 0; h < H; ++h) {
      const uint8_t* rec = records[size_t(side) * H + h].data();
      for (size_t t = 0; t < tokens; ++t, rec += layout.record_bytes) {
        const size_t pos = old_len + t;
        uint8_t* blk = im.block(layer, s.pages[pos / P], int(h), side == 1);
        const size_t slot = pos % P;
        for_each_section(layout, [&](const SectionLayout& sec) {
          std::memcpy(blk + sec.block_offset + slot * sec.bytes, rec + sec.record_offset,
                      sec.bytes);
        });
      }
    }
  }
  s.lengths[size_t(layer)] = new_len;
}

void KVCache::truncate(SequenceId seq, size_t tokens) {
  auto& im = *impl_;
  Impl::Sequence& s = im.find(seq, "truncate");
  const size_t shortest = *std::min_element(s.lengths.begin(), s.lengths.end());
  TQKV_CHECK(tokens <= shortest, "truncate: cannot remove ", tokens, " tokens from sequence ",
             seq, ", which holds ", shortest, " in its shortest layer");
  for (size_t& n : s.lengths) n -= tokens;
  im.release_pages_beyond(s);
}

void KVCache::free_sequence(SequenceId seq) {
  auto& im = *impl_;
  Impl::Sequence& s = im.find(seq, "free_sequence");
  std::fill(s.lengths.begin(), s.lengths.end(), 0);
  im.release_pages_beyond(s);
  im.sequences.erase(seq);
}

size_t KVCache::bytes_per_token_per_layer() const {
  return size_t(impl_->config.kv_heads) *
         (impl_->key_layout.record_bytes + impl_->value_layout.record_bytes);
}
size_t KVCache::bytes_per_token() const {
  return bytes_per_token_per_layer() * size_t(impl_->config.layers);
}
size_t KVCache::fp16_bytes_per_token() const {
  const auto& c = impl_->config;
  return size_t(c.layers) * size_t(c.kv_heads) * size_t(c.head_dim) * 2 * 2;
}
size_t KVCache::page_bytes() const {
  return impl_->layer_page_bytes * size_t(impl_->config.layers);
}
size_t KVCache::pages_total() const { return impl_->config.max_pages; }
size_t KVCache::pages_free() const { return impl_->free_pages.size(); }
size_t KVCache::stored_bytes() const {
  size_t tokens = 0;
  for (const auto& [id, s] : impl_->sequences)
    for (size_t n : s.lengths) tokens += n;
  return tokens * bytes_per_token_per_layer();
}
size_t KVCache::used_page_bytes() const {
  return (pages_total() - pages_free()) * page_bytes();
}

const Codec& KVCache::key_codec(int layer, int head) const {
  impl_->check_layer(layer, "key_codec");
  TQKV_CHECK(head >= 0 && head < impl_->config.kv_heads, "key_codec: head ", head,
             " is outside 0..", impl_->config.kv_heads - 1);
  return impl_->key_codecs[impl_->codec_index(layer, head)];
}
const Codec& KVCache::value_codec(int layer, int head) const {
  impl_->check_layer(layer, "value_codec");
  TQKV_CHECK(head >= 0 && head < impl_->config.kv_heads, "value_codec: head ", head,
             " is outside 0..", impl_->config.kv_heads - 1);
  return impl_->value_codecs[impl_->codec_index(layer, head)];
}
const BlockLayout& KVCache::key_layout() const { return impl_->key_layout; }
const BlockLayout& KVCache::value_layout() const { return impl_->value_layout; }

std::span<const uint32_t> KVCache::page_table(SequenceId seq) const {
  return impl_->find(seq, "page_table").pages;
}
const uint8_t* KVCache::key_block(int layer, uint32_t page, int head) const {
  return impl_->block(layer, page, head, false);
}
const uint8_t* KVCache::value_block(int layer, uint32_t page, int head) const {
  return impl_->block(layer, page, head, true);
}

void KVCache::read_records(SequenceId seq, int layer, int head, bool values, size_t first,
                           size_t count, uint8_t* records) const {
  const auto& im = *impl_;
  im.check_layer(layer, "read_records");
  const Impl::Sequence& s = im.find(seq, "read_records");
  TQKV_CHECK(head >= 0 && head < im.config.kv_heads, "read_records: head ", head,
             " is outside 0..", im.config.kv_heads - 1);
  TQKV_CHECK(first <= s.lengths[size_t(layer)] && count <= s.lengths[size_t(layer)] - first,
             "read_records: tokens [", first, ", ", first + count, ") are beyond the ",
             s.lengths[size_t(layer)], " stored");
  const BlockLayout& layout = values ? im.value_layout : im.key_layout;
  const size_t P = size_t(im.config.page_tokens);
  for (size_t i = 0; i < count; ++i) {
    const size_t pos = first + i;
    const uint8_t* blk = im.block(layer, s.pages[pos / P], head, values);
    uint8_t* rec = records + i * layout.record_bytes;
    for_each_section(layout, [&](const SectionLayout& sec) {
      std::memcpy(rec + sec.record_offset, blk + sec.block_offset + (pos % P) * sec.bytes,
                  sec.bytes);
    });
  }
}

// --- files ---------------------------------------------------------------------------------------

std::vector<uint8_t> KVCache::serialize() const {
  const auto& im = *impl_;
  file::SavedCache saved;
  saved.layers = im.config.layers;
  saved.kv_heads = im.config.kv_heads;
  saved.head_dim = im.config.head_dim;
  saved.page_tokens = im.config.page_tokens;
  saved.max_pages = im.config.max_pages;
  saved.key = im.config.key;
  saved.value = im.config.value;
  for (const Codec& codec : im.key_codecs) saved.key_specs.push_back(codec.spec());
  for (const Codec& codec : im.value_codecs) saved.value_specs.push_back(codec.spec());
  saved.page_bytes = page_bytes();
  size_t pages = 0;
  for (const auto& [id, s] : im.sequences) {
    saved.sequences.push_back({id, std::vector<uint64_t>(s.lengths.begin(), s.lengths.end()),
                               uint64_t(s.pages.size())});
    pages += s.pages.size();
  }
  saved.next_id = im.next_id;
  saved.payload.resize(pages * saved.page_bytes);
  uint8_t* out = saved.payload.data();
  for (const auto& [id, s] : im.sequences)
    for (uint32_t page : s.pages)
      for (int l = 0; l < im.config.layers; ++l, out += im.layer_page_bytes)
        std::memcpy(out, im.pools[size_t(l)].get() + size_t(page) * im.layer_page_bytes,
                    im.layer_page_bytes);
  return file::serialize_cache(saved);
}

void KVCache::save(const std::filesystem::path& path) const {
  file::write_bytes(path, serialize());
}

KVCache KVCache::parse(std::span<const uint8_t> bytes, std::string_view name, size_t max_pages) {
  file::SavedCache saved = file::parse_cache(bytes, name);
  CacheConfig config;
  config.layers = saved.layers;
  config.kv_heads = saved.kv_heads;
  config.head_dim = saved.head_dim;
  config.page_tokens = saved.page_tokens;
  config.key = saved.key;
  config.value = saved.value;
  size_t pages = 0;
  for (const auto& s : saved.sequences) pages += size_t(s.pages);
  config.max_pages = max_pages ? max_pages : size_t(saved.max_pages);
  TQKV_CHECK(config.max_pages >= pages, name, ": the cache holds ", pages,
             " pages, more than the pool of ", config.max_pages);
  std::optional<KVCache> cache;
  try {
    cache.emplace(config);
  } catch (const Error& e) {
    throw Error(detail::concat(name, ": ", e.what()));
  }
  auto& im = *cache->impl_;
  TQKV_CHECK(saved.page_bytes == cache->page_bytes(), name, ": page_bytes is ", saved.page_bytes,
             " but this configuration has ", cache->page_bytes(), "-byte pages");
  for (int side = 0; side < 2; ++side) {
    const auto& specs = side == 0 ? saved.key_specs : saved.value_specs;
    auto& codecs = side == 0 ? im.key_codecs : im.value_codecs;
    // The configured spec as the constructor normalized it (dim = head_dim).
    const CodecSpec& base = side == 0 ? im.config.key : im.config.value;
    TQKV_CHECK(specs.size() == codecs.size(), name, ": ", specs.size(), " ",
               side == 0 ? "key" : "value", " codecs for ", codecs.size(), " (layer, head) pairs");
    for (size_t i = 0; i < specs.size(); ++i) {
      CodecSpec a = specs[i], b = base;
      a.outlier_channels.clear();
      b.outlier_channels.clear();
      TQKV_CHECK(a == b && (base.outlier_channels.empty() ||
                            specs[i].outlier_channels == base.outlier_channels),
                 name, ": codec ", i, " does not match the cache's ",
                 side == 0 ? "key" : "value", " codec");
      try {
        codecs[i] = Codec(specs[i]);
      } catch (const Error& e) {
        throw Error(detail::concat(name, ": codec ", i, ": ", e.what()));
      }
    }
  }
  // Sequences whose layers hold tokens need codecs with channels for those layers.
  const size_t P = size_t(config.page_tokens);
  const uint8_t* in = saved.payload.data();
  for (const auto& ss : saved.sequences) {
    TQKV_CHECK(ss.lengths.size() == size_t(config.layers), name, ": sequence ", ss.id, " has ",
               ss.lengths.size(), " layer lengths for ", config.layers, " layers");
    uint64_t longest = 0;
    for (size_t l = 0; l < ss.lengths.size(); ++l) {
      longest = std::max(longest, ss.lengths[l]);
      for (int h = 0; h < config.kv_heads && ss.lengths[l] > 0; ++h)
        TQKV_CHECK(im.key_codecs[im.codec_index(int(l), h)].ready() &&
                       im.value_codecs[im.codec_index(int(l), h)].ready(),
                   name, ": sequence ", ss.id, " stores tokens in layer ", l,
                   " but the codecs of that layer have no outlier channels");
    }
    TQKV_CHECK(ss.pages == (longest + P - 1) / P, name, ": sequence ", ss.id, " has ", ss.pages,
               " pages for ", longest, " tokens of ", P, " per page");
    TQKV_CHECK(ss.id < saved.next_id, name, ": sequence id ", ss.id, " is not below next_id ",
               saved.next_id);
    Impl::Sequence s{{}, std::vector<size_t>(ss.lengths.begin(), ss.lengths.end())};
    for (uint64_t i = 0; i < ss.pages; ++i) {
      const uint32_t page = im.free_pages.back();
      im.free_pages.pop_back();
      for (int l = 0; l < config.layers; ++l, in += im.layer_page_bytes)
        std::memcpy(im.pools[size_t(l)].get() + size_t(page) * im.layer_page_bytes, in,
                    im.layer_page_bytes);
      s.pages.push_back(page);
    }
    TQKV_CHECK(im.sequences.emplace(ss.id, std::move(s)).second, name, ": sequence id ", ss.id,
               " appears twice");
  }
  im.next_id = saved.next_id;
  return std::move(*cache);
}

KVCache KVCache::load(const std::filesystem::path& path, size_t max_pages) {
  return parse(file::read_bytes(path), path.string(), max_pages);
}

}  // namespace tqkv
