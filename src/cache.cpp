#include "tqkv/cache.hpp"

#include "cache_impl.hpp"

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <optional>

#include "cuda/backend.hpp"
#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"
#include "tqkv/file.hpp"
#include "tqkv/half.hpp"

namespace tqkv {

namespace {

constexpr size_t kAlign = 64;
constexpr size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

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

PagePool::PagePool(Device device, size_t bytes) : device_(device) {
  if (bytes == 0) return;
  if (device.is_cuda()) {
    data_ = static_cast<uint8_t*>(gpu::allocate(device, bytes));
    // Zeroed once: attention kernels copy whole tiles, and slots past a sequence's end must
    // hold finite norms (they are masked, but a NaN times a zero probability is still NaN).
    gpu::fill(device, data_, 0, bytes, nullptr);
    synchronize(device);
    return;
  }
  void* p = std::aligned_alloc(kAlign, align_up(bytes));
  TQKV_CHECK(p != nullptr, "KV cache: cannot allocate ", bytes, " bytes for the page pool");
  data_ = static_cast<uint8_t*>(p);
}

PagePool::~PagePool() {
  if (device_.is_cuda()) {
    gpu::release(device_, data_);
  } else {
    std::free(data_);
  }
}

KVCache::Impl::Sequence& KVCache::Impl::find(SequenceId id, const char* what) {
  auto it = sequences.find(id);
  TQKV_CHECK(it != sequences.end(), what, ": sequence ", id, " does not exist");
  return it->second;
}

void KVCache::Impl::check_layer(int layer, const char* what) const {
  TQKV_CHECK(layer >= 0 && layer < config.layers, what, ": layer ", layer, " is outside 0..",
             config.layers - 1);
}

void KVCache::Impl::release_pages_beyond(Sequence& s) {
  const size_t longest = *std::max_element(s.lengths.begin(), s.lengths.end());
  const size_t keep = (longest + size_t(config.page_tokens) - 1) / size_t(config.page_tokens);
  while (s.pages.size() > keep) {
    free_pages.push_back(s.pages.back());
    s.pages.pop_back();
  }
}

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
  if (c.device.is_cuda()) {
    check_device(c.device);
    TQKV_CHECK(c.max_sequences >= 1 && c.max_sequences <= 65536,
               "KV cache: max_sequences must be in 1..65536 for a GPU cache, got ",
               c.max_sequences);
    TQKV_CHECK(c.max_pages <= (size_t(1) << 32) / c.max_sequences, "KV cache: device page ",
               "tables of ", c.max_sequences, " sequences x ", c.max_pages,
               " pages would exceed 16 GiB; lower max_sequences or max_pages");
  }
  for (int l = 0; l < c.layers; ++l) im.pools.emplace_back(c.device, c.max_pages * im.layer_page_bytes);
  im.free_pages.resize(c.max_pages);
  for (size_t i = 0; i < c.max_pages; ++i) im.free_pages[i] = uint32_t(c.max_pages - 1 - i);
  if (c.device.is_cuda()) im.init_gpu();
}

// --- GPU mirror ----------------------------------------------------------------------------------

namespace {

// Float16 bits of two values, the first in the low half (a CUDA half2).
uint32_t half_pair(float lo, float hi) {
  return uint32_t(float_to_half(lo)) | (uint32_t(float_to_half(hi)) << 16);
}

// Appends `bytes` to the blob at a 256-byte boundary; returns the offset.
size_t put(std::vector<uint8_t>& blob, const void* data, size_t bytes) {
  const size_t at = (blob.size() + 255) / 256 * 256;
  blob.resize(at + bytes);
  std::memcpy(blob.data() + at, data, bytes);
  return at;
}

}  // namespace

void KVCache::Impl::init_gpu() {
  gpu = std::make_unique<GpuMirror>();
  GpuMirror& m = *gpu;
  const Device dev = config.device;
  // Every (layer, head) of a side shares rotations, codebooks and QJL matrices (same seed); only
  // channel lists differ, so one set of tables per side serves all.
  std::vector<uint8_t> blob;
  std::vector<uint32_t> sign_pairs(256);
  for (int b = 0; b < 256; ++b)
    sign_pairs[size_t(b)] = half_pair((b & 15) == 1 ? 1.0f : -1.0f, (b >> 4) == 1 ? 1.0f : -1.0f);
  const size_t sign_pairs_at = put(blob, sign_pairs.data(), 1024);
  struct Offsets {
    size_t signs = 0, rotation = 0, boundaries = 0, centroids = 0, pairs = 0, qjl = 0;
    size_t buckets = SIZE_MAX;
  };
  std::vector<Offsets> offsets[2];
  for (int side = 0; side < 2; ++side) {
    const Codec& codec = side ? value_codecs[0] : key_codecs[0];
    const BlockLayout& layout = side ? value_layout : key_layout;
    gpu::CodecTables& t = side ? m.value : m.key;
    t.groups = int(codec.groups().size());
    TQKV_ASSERT(t.groups <= gpu::kMaxGroups);
    t.norm_f16 = codec.spec().norm_format == NormFormat::f16;
    t.center = codec.spec().center;
    t.block_bytes = uint32_t(layout.block_bytes);
    for (int gi = 0; gi < t.groups; ++gi) {
      const ChannelGroup& g = codec.groups()[size_t(gi)];
      const auto& lg = layout.groups[size_t(gi)];
      gpu::GroupTables& gt = t.g[gi];
      Offsets o;
      gt.dim = g.dim;
      gt.mse_bits = g.mse_bits;
      gt.qjl = g.qjl;
      const Rotation& rot = codec.rotation(size_t(gi));
      gt.dense = rot.kind() == RotationKind::dense;
      gt.gain = rot.gain();
      gt.qjl_factor = g.qjl ? float(1.2533141373155003 / double(g.dim)) : 0.0f;
      if (gt.dense) {
        o.rotation = put(blob, rot.matrix().data(), rot.matrix().size() * 4);
      } else {
        o.signs = put(blob, rot.signs().data(), rot.signs().size() * 4);
      }
      if (const Codebook* cb = codec.codebook(size_t(gi))) {
        const auto c = cb->centroids_f32();
        const auto bd = cb->boundaries_f32();
        o.boundaries = put(blob, bd.data(), bd.size() * 4);
        o.centroids = put(blob, c.data(), c.size() * 4);
        std::vector<uint32_t> pairs(256);
        for (size_t b = 0; b < 256; ++b) {
          const size_t lo = b & 15, hi = b >> 4;
          pairs[b] = half_pair(lo < c.size() ? c[lo] : 0.0f, hi < c.size() ? c[hi] : 0.0f);
        }
        o.pairs = put(blob, pairs.data(), 1024);
        if (const auto b = gpu::code_buckets(bd.data(), bd.size())) {
          o.buckets = put(blob, b->counts.data(), b->counts.size());
          gt.bucket_scale = b->scale;
          gt.bucket_offset = b->offset;
        }
      }
      if (g.qjl) o.qjl = put(blob, codec.qjl_matrix(size_t(gi)).data(), size_t(g.dim) * g.dim * 4);
      gt.codes_at = uint32_t(lg.codes.block_offset);
      gt.codes_bytes = uint32_t(lg.codes.bytes);
      gt.signs_at = uint32_t(lg.signs.block_offset);
      gt.signs_bytes = uint32_t(lg.signs.bytes);
      gt.norm_at = uint32_t(lg.norm.block_offset);
      gt.gamma_at = uint32_t(lg.gamma.block_offset);
      offsets[side].push_back(o);
    }
    // Stage buffers hold a tile's keys, then its values.
    gpu::make_terms(t, side ? gpu::kValueLanesPerWord : gpu::kKeyLanesPerWord,
                    side ? m.key.stage_end : 0u);
  }
  m.tables = DeviceBuffer(dev, blob.size());
  m.tables.upload(blob.data(), blob.size());
  const auto* base = m.tables.as<const uint8_t>();
  for (int side = 0; side < 2; ++side) {
    gpu::CodecTables& t = side ? m.value : m.key;
    for (int gi = 0; gi < t.groups; ++gi) {
      const Offsets& o = offsets[side][size_t(gi)];
      gpu::GroupTables& gt = t.g[gi];
      auto at = [&](size_t off) { return reinterpret_cast<const float*>(base + off); };
      if (gt.dense) gt.rotation = at(o.rotation); else gt.signs = at(o.signs);
      if (gt.mse_bits > 0) {
        gt.boundaries = at(o.boundaries);
        gt.centroids = at(o.centroids);
        gt.code_pairs = reinterpret_cast<const uint32_t*>(base + o.pairs);
        if (o.buckets != SIZE_MAX) gt.buckets = base + o.buckets;
      }
      if (gt.qjl) gt.qjl_matrix = at(o.qjl);
      gt.sign_pairs = reinterpret_cast<const uint32_t*>(base + sign_pairs_at);
    }
  }
  const size_t d = size_t(config.head_dim), L = size_t(config.layers);
  const size_t H = size_t(config.kv_heads), S = config.max_sequences;
  m.channels = DeviceBuffer(dev, L * H * 2 * d * 2);
  m.offsets = DeviceBuffer(dev, L * H * 2 * d * 4);
  for (int l = 0; l < config.layers; ++l)
    for (int h = 0; h < config.kv_heads; ++h)
      for (int side = 0; side < 2; ++side) upload_channels(l, h, side);
  m.page_tables = DeviceBuffer(dev, std::max<size_t>(S * config.max_pages * 4, 4));
  m.lengths = DeviceBuffer(dev, S * L * 4);
  m.lengths.fill(0);
  m.flag = DeviceBuffer(dev, 4);
  m.flag.fill(0xff);  // and so between appends: read_flag resets it after a refusal
  m.flag_host = pinned_words(1);
  m.step_flags = DeviceBuffer(dev, kQueuedSteps * 4);
  m.step_flags.fill(0xff);
  m.step_flags_host = pinned_words(kQueuedSteps);
  m.queued_done = GpuEvent(gpu::create_event(config.device));
  m.free_slots.resize(S);
  for (size_t i = 0; i < S; ++i) m.free_slots[i] = uint32_t(S - 1 - i);
}

uint32_t KVCache::Impl::read_flag() {
  uint32_t* host = gpu->flag_host.get();
  gpu::download(config.device, host, gpu->flag.data(), 4, gpu->stream);
  const uint32_t value = *host;
  if (value != 0xffffffffu) gpu::fill(config.device, gpu->flag.data(), 0xff, 4, gpu->stream);
  return value;
}

void KVCache::Impl::upload_channels(int layer, int head, int side) {
  const Codec& codec = (side ? value_codecs : key_codecs)[codec_index(layer, head)];
  const size_t d = size_t(config.head_dim);
  std::vector<int16_t> list(d);
  size_t at = 0;
  if (codec.ready())
    for (const ChannelGroup& g : codec.groups())
      for (int ch : g.channels) list[at++] = int16_t(ch);
  for (; at < d; ++at) list[at] = int16_t(at);  // not chosen yet: never read
  const size_t index = (codec_index(layer, head)) * 2 + size_t(side);
  gpu::upload(config.device, gpu->channels.as<uint8_t>() + index * d * 2, list.data(), d * 2,
              gpu->stream);
  std::vector<float> offset(d, 0.0f);  // by original channel; 0 where the codec does not center
  if (codec.ready() && !codec.offset().empty()) offset = codec.offset();
  gpu::upload(config.device, gpu->offsets.as<uint8_t>() + index * d * 4, offset.data(), d * 4,
              gpu->stream);
}

void KVCache::Impl::upload_pages(const Sequence& s, size_t first) {
  if (first >= s.pages.size()) return;
  gpu::upload(config.device,
              gpu->page_tables.as<uint32_t>() + size_t(s.slot) * config.max_pages + first,
              s.pages.data() + first, (s.pages.size() - first) * 4, gpu->stream);
}

void KVCache::Impl::upload_lengths(const Sequence& s) {
  std::vector<uint32_t> lengths(s.lengths.begin(), s.lengths.end());
  gpu::upload(config.device, gpu->lengths.as<uint32_t>() + size_t(s.slot) * lengths.size(),
              lengths.data(), lengths.size() * 4, gpu->stream);
}

void KVCache::Impl::zero_pages(std::span<const uint32_t> pages) {
  // Runs of consecutive page numbers are zeroed with one call per layer.
  for (size_t i = 0; i < pages.size();) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    for (int l = 0; l < config.layers; ++l) {
      uint8_t* at = pools[size_t(l)].data() + size_t(pages[i]) * layer_page_bytes;
      if (on_gpu()) {
        gpu::fill(config.device, at, 0, (j - i) * layer_page_bytes, gpu->stream);
      } else {
        std::memset(at, 0, (j - i) * layer_page_bytes);
      }
    }
    i = j;
  }
}

gpu::CacheView KVCache::Impl::view(int layer) const {
  gpu::CacheView v;
  v.pool = pools[size_t(layer)].data();
  v.layer_page_bytes = layer_page_bytes;
  v.key_block_bytes = uint32_t(key_layout.block_bytes);
  v.value_block_bytes = uint32_t(value_layout.block_bytes);
  v.page_tokens = config.page_tokens;
  v.page_shift = std::has_single_bit(unsigned(config.page_tokens))
                     ? std::countr_zero(unsigned(config.page_tokens))
                     : -1;
  v.kv_heads = config.kv_heads;
  v.head_dim = config.head_dim;
  v.layers = config.layers;
  v.layer = layer;
  v.page_tables = gpu->page_tables.as<const uint32_t>();
  v.page_table_stride = uint32_t(config.max_pages);
  v.lengths = gpu->lengths.as<const uint32_t>();
  v.channels = gpu->channels.as<const int16_t>();
  v.offsets = gpu->offsets.as<const float>();
  v.key = gpu->key;
  v.value = gpu->value;
  return v;
}

void KVCache::set_stream(CudaStream stream) {
  TQKV_CHECK(impl_->on_gpu(), "set_stream: this cache lives on the CPU");
  impl_->settle();
  impl_->gpu->stream = stream;
}
CudaStream KVCache::stream() const { return impl_->on_gpu() ? impl_->gpu->stream : nullptr; }

KVCache KVCache::to(Device device) const {
  return parse(serialize(), "KV cache copy", impl_->config.max_pages, device);
}

const CacheConfig& KVCache::config() const { return impl_->config; }

SequenceId KVCache::add_sequence() {
  auto& im = *impl_;
  Impl::Sequence s{{}, std::vector<size_t>(size_t(im.config.layers), 0), 0};
  if (im.on_gpu()) {
    TQKV_CHECK(!im.gpu->free_slots.empty(), "add_sequence: all ", im.config.max_sequences,
               " sequences of this GPU cache are in use (CacheConfig::max_sequences)");
    s.slot = im.gpu->free_slots.back();
    im.upload_lengths(s);
    im.gpu->free_slots.pop_back();
  }
  const SequenceId id = im.next_id++;
  im.sequences[id] = std::move(s);
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

namespace {

struct Calibrated {
  int side;
  size_t head;
  Codec codec;
};

std::string append_where(SequenceId seq, int layer, int side, size_t head) {
  return detail::concat("append: sequence ", seq, ", layer ", layer, ", ",
                        side == 0 ? "keys" : "values", " of KV head ", head, ": ");
}

}  // namespace

// The (side, head) pairs of a layer whose codecs are not ready, in (side, head) order.
static std::vector<std::pair<int, size_t>> uncalibrated(const KVCache::Impl& im, int layer) {
  std::vector<std::pair<int, size_t>> pending;
  for (int side = 0; side < 2; ++side)
    for (size_t h = 0; h < size_t(im.config.kv_heads); ++h)
      if (!(side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))].ready())
        pending.emplace_back(side, h);
  return pending;
}

// Chooses what the (layer, head) codecs that are not ready lack (outlier channels, offsets) from
// host copies of this append's keys and values; nothing is installed here. The (side, head)
// pairs are independent and run in parallel (each thread holds one pair's rows as float32, so
// the threads are capped to keep those copies under 256 MB together); what fails is reported
// for the first pair in (side, head) order that fails, as a serial loop would.
static std::vector<Calibrated> calibrate(const KVCache::Impl& im, SequenceId seq, int layer,
                                         const uint8_t* k, const uint8_t* v, size_t tokens,
                                         ScalarType type) {
  const size_t H = size_t(im.config.kv_heads), d = size_t(im.config.head_dim);
  const std::vector<std::pair<int, size_t>> pending = uncalibrated(im, layer);
  if (pending.empty()) return {};  // (every append of a calibrated cache: no rows, no threads)
  std::vector<std::optional<Codec>> codecs(pending.size());
  std::vector<std::exception_ptr> errors(pending.size());
  const long long n = (long long)pending.size();
  const size_t row_copies = std::max<size_t>(1, (size_t(256) << 20) / (tokens * d * 4 + 1));
  const int threads = int(std::min<size_t>({size_t(num_threads()), size_t(n), row_copies}));
#pragma omp parallel num_threads(std::max(1, threads))
  {
    std::vector<float> rows(tokens * d);
#pragma omp for schedule(dynamic, 1)
    for (long long i = 0; i < n; ++i) {
      const auto [side, h] = pending[size_t(i)];
      try {
        for (size_t t = 0; t < tokens; ++t) {
          row_to_float(side == 0 ? k : v, type, t * H + h, int(d), &rows[t * d]);
          for (size_t j = 0; j < d; ++j)
            TQKV_CHECK(std::isfinite(rows[t * d + j]), append_where(seq, layer, side, h),
                       "token ", t, " has a non-finite element (", rows[t * d + j],
                       " at index ", j, ")");
        }
        const auto& all = side == 0 ? im.key_codecs : im.value_codecs;
        codecs[size_t(i)].emplace(
            all[im.codec_index(layer, int(h))].calibrated_spec(rows.data(), tokens));
      } catch (...) {
        errors[size_t(i)] = std::current_exception();
      }
    }
  }
  std::vector<Calibrated> calibrated;
  for (size_t i = 0; i < pending.size(); ++i) {
    if (errors[i]) std::rethrow_exception(errors[i]);
    calibrated.push_back({pending[i].first, pending[i].second, std::move(*codecs[i])});
  }
  return calibrated;
}

// calibrate's choice for a GPU cache, from the device copy of the append's input: the device
// computes each pending pair's channel statistics (offsets, energies, the first non-finite
// element; gpu::CalibrationParams) with the CPU's arithmetic, so the choice is the CPU's, and a
// bad element gets the CPU's message.
static std::vector<Calibrated> calibrate_on_device(const KVCache::Impl& im, SequenceId seq,
                                                   int layer, const void* k, const void* v,
                                                   size_t tokens, ScalarType type) {
  const std::vector<std::pair<int, size_t>> pending = uncalibrated(im, layer);
  if (pending.empty()) return {};
  const size_t H = size_t(im.config.kv_heads), d = size_t(im.config.head_dim);
  const size_t pairs = pending.size();
  auto codec_of = [&](size_t i) -> const Codec& {
    const auto [side, h] = pending[i];
    return (side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))];
  };
  // One device buffer: jobs [pairs][3], offsets [pairs][d] floats, energies [pairs][d] doubles,
  // first bad tokens [pairs][d].
  std::vector<int32_t> jobs(3 * pairs);
  std::vector<float> offsets(pairs * d, 0.0f);
  for (size_t i = 0; i < pairs; ++i) {
    const CodecSpec spec = codec_of(i).spec();
    const bool fractional = codec_of(i).groups().size() > 1;
    jobs[3 * i] = pending[i].first;
    jobs[3 * i + 1] = int32_t(pending[i].second);
    jobs[3 * i + 2] = (spec.center && spec.offset.empty() ? gpu::kCalibrateOffset : 0) |
                      (spec.offset.empty() ? 0 : gpu::kCalibrateGivenOffset) |
                      (fractional && spec.outlier_channels.empty() ? gpu::kCalibrateEnergies : 0);
    if (!spec.offset.empty()) std::copy(spec.offset.begin(), spec.offset.end(), &offsets[i * d]);
  }
  const size_t jobs_bytes = (jobs.size() * 4 + 7) & ~size_t(7), n = pairs * d;
  DeviceBuffer scratch(im.config.device, jobs_bytes + n * (8 + 4 + 4));
  auto* base = scratch.as<uint8_t>();
  gpu::CalibrationParams p;
  p.k = k;
  p.v = v;
  p.type = int(type);
  p.tokens = uint32_t(tokens);
  p.kv_heads = int(H);
  p.head_dim = int(d);
  p.jobs = reinterpret_cast<const int32_t*>(base);
  p.energies = reinterpret_cast<double*>(base + jobs_bytes);
  p.offsets = reinterpret_cast<float*>(base + jobs_bytes + 8 * n);
  p.first_bad = reinterpret_cast<uint32_t*>(base + jobs_bytes + 12 * n);
  const CudaStream stream = im.gpu->stream;
  gpu::upload(im.config.device, base, jobs.data(), jobs.size() * 4, stream);
  gpu::upload(im.config.device, p.offsets, offsets.data(), n * 4, stream);
  gpu::launch_calibration(im.config.device, p, int(pairs), stream);
  std::vector<double> energies(n);
  std::vector<uint32_t> first_bad(n);
  gpu::download(im.config.device, energies.data(), p.energies, n * 8, stream);
  gpu::download(im.config.device, offsets.data(), p.offsets, n * 4, stream);
  gpu::download(im.config.device, first_bad.data(), p.first_bad, n * 4, stream);
  std::vector<Calibrated> calibrated;
  for (size_t i = 0; i < pairs; ++i) {
    const auto [side, h] = pending[i];
    // The first bad element in (token, index) order, as calibrate's check finds it.
    const uint32_t* bad = &first_bad[i * d];
    const size_t j = size_t(std::min_element(bad, bad + d) - bad);
    if (bad[j] != 0xffffffffu) {
      const size_t t = bad[j], elem = type == ScalarType::f32 ? 4 : 2;
      uint8_t raw[4] = {};
      gpu::download(im.config.device, raw,
                    static_cast<const uint8_t*>(side == 0 ? k : v) + ((t * H + h) * d + j) * elem,
                    elem, stream);
      float x = 0.0f;
      row_to_float(raw, type, 0, 1, &x);
      throw Error(append_where(seq, layer, side, h) + detail::concat("token ", t,
                  " has a non-finite element (", x, " at index ", j, ")"));
    }
    calibrated.push_back(
        {side, h,
         Codec(codec_of(i).calibrated_spec(std::span<const float>(&offsets[i * d], d),
                                           std::span<const double>(&energies[i * d], d)))});
  }
  return calibrated;
}

// A codec's message about the one vector it was given ("vector 0") about token `token` instead.
static std::string as_token(std::string what, size_t token) {
  const std::string vector0 = "vector 0";
  if (auto at = what.find(vector0); at != std::string::npos)
    what.replace(at, vector0.size(), "token " + std::to_string(token));
  return what;
}

// Says exactly why the GPU append kernel refused token `t` of input `x` ([tokens][kv_heads]
// [head_dim] on the device) for (side, head h), from a host copy of its row encoded by the codec
// the kernel used (ready: encoding one row calibrates nothing); the message names it as token
// `named`.
[[noreturn]] static void throw_refused(const KVCache::Impl& im, SequenceId seq, int layer,
                                       int side, size_t h, const Codec& used, const void* x,
                                       size_t t, size_t named, ScalarType type) {
  const size_t H = size_t(im.config.kv_heads), d = size_t(im.config.head_dim);
  const size_t elem = type == ScalarType::f32 ? 4 : 2;
  std::vector<uint8_t> raw(d * elem);
  gpu::download(im.config.device, raw.data(),
                static_cast<const uint8_t*>(x) + (t * H + h) * d * elem, raw.size(),
                im.gpu->stream);
  std::vector<float> row(d);
  row_to_float(raw.data(), type, 0, int(d), row.data());
  std::vector<uint8_t> record(used.record_bytes());
  try {
    used.encode(row.data(), 1, record.data());
  } catch (const Error& e) {
    throw Error(append_where(seq, layer, side, h) + as_token(e.what(), named));
  }
  throw Error(append_where(seq, layer, side, h) + "token " + std::to_string(named) +
              " cannot be encoded");
}

void KVCache::append(SequenceId seq, int layer, const void* k, const void* v, size_t tokens,
                     ScalarType type) {
  auto& im = *impl_;
  im.settle();
  const CacheConfig& c = im.config;
  im.check_layer(layer, "append");
  Impl::Sequence& s = im.find(seq, "append");
  if (tokens == 0) return;
  TQKV_CHECK(k != nullptr && v != nullptr, "append: null key or value pointer");
  TQKV_CHECK(int(type) <= 2, "append: unknown scalar type ", int(type));
  const size_t P = size_t(c.page_tokens);
  const size_t old_len = s.lengths[size_t(layer)];
  const size_t new_len = old_len + tokens;
  const size_t pages_needed = (new_len + P - 1) / P;
  const size_t extra = pages_needed > s.pages.size() ? pages_needed - s.pages.size() : 0;
  TQKV_CHECK(extra <= im.free_pages.size(), "append: out of pages: ", tokens,
             " more tokens for sequence ", seq, " need ", extra, " new pages, but only ",
             im.free_pages.size(), " of ", c.max_pages, " are free");
  const size_t H = size_t(c.kv_heads), d = size_t(c.head_dim);
  const size_t elem = type == ScalarType::f32 ? 4 : 2;
  if (im.on_gpu()) {
    TQKV_CHECK(tokens <= (size_t(1) << 31) / (2 * H), "append: ", tokens,
               " tokens in one GPU append is too many; append in chunks");
    // Outlier channels and offsets, where still to choose, come from the device's statistics.
    std::vector<Calibrated> calibrated;
    bool ready = true;
    for (size_t h = 0; h < H; ++h)
      ready &= im.key_codecs[im.codec_index(layer, int(h))].ready() &&
               im.value_codecs[im.codec_index(layer, int(h))].ready();
    if (!ready) calibrated = calibrate_on_device(im, seq, layer, k, v, tokens, type);
    // Kernels read channel lists and offsets from the device. A failed append puts the codecs
    // back as they were (not ready) and their lists with them.
    std::vector<Codec> previous;
    for (const Calibrated& cal : calibrated) {
      auto& slot = (cal.side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(cal.head))];
      previous.push_back(slot);
      slot = cal.codec;
      im.upload_channels(layer, int(cal.head), cal.side);
    }
    auto restore = [&] {
      for (size_t i = 0; i < calibrated.size(); ++i) {
        (calibrated[i].side == 0 ? im.key_codecs : im.value_codecs)
            [im.codec_index(layer, int(calibrated[i].head))] = previous[i];
        im.upload_channels(layer, int(calibrated[i].head), calibrated[i].side);
      }
    };
    const size_t first_new = s.pages.size();
    for (size_t i = 0; i < extra; ++i) {
      s.pages.push_back(im.free_pages.back());
      im.free_pages.pop_back();
    }
    im.zero_pages(std::span<const uint32_t>(s.pages).subspan(first_new));
    im.upload_pages(s, first_new);
    gpu::AppendParams p;
    p.cache = im.view(layer);
    p.k = k;
    p.v = v;
    p.type = int(type);
    p.slot = s.slot;
    p.first_token = old_len;
    p.tokens = uint32_t(tokens);
    p.lengths = im.gpu->lengths.as<uint32_t>();
    p.first_invalid = im.gpu->flag.as<uint32_t>();
    uint32_t first_invalid = 0;
    try {
      gpu::launch_append(c.device, p, im.gpu->stream);
      first_invalid = im.read_flag();
    } catch (...) {
      first_invalid = 0;  // a CUDA error: undo, then rethrow
      for (size_t i = first_new; i < s.pages.size(); ++i) im.free_pages.push_back(s.pages[i]);
      s.pages.resize(first_new);
      restore();
      throw;
    }
    if (first_invalid != 0xffffffffu) {
      for (size_t i = s.pages.size(); i > first_new; --i) im.free_pages.push_back(s.pages[i - 1]);
      s.pages.resize(first_new);
      im.upload_lengths(s);  // the kernel wrote the new one
      const size_t t = first_invalid % tokens, h = (first_invalid / tokens) % H;
      const int side = int(first_invalid / (tokens * H));
      const Codec used = (side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))];
      restore();
      throw_refused(im, seq, layer, side, h, used, side == 0 ? k : v, t, t, type);
    }
    s.lengths[size_t(layer)] = new_len;  // (the kernel wrote it on the device)
    return;
  }

  // Encode everything first (this validates the input); fractional codecs that have no channels
  // yet get candidates that are only installed once every head has encoded.
  const auto* k8 = static_cast<const uint8_t*>(k);
  const auto* v8 = static_cast<const uint8_t*>(v);
  const std::vector<Calibrated> calibrated = calibrate(im, seq, layer, k8, v8, tokens, type);
  std::vector<std::vector<uint8_t>> records(2 * H);
  std::vector<uint8_t> head_raw(tokens * d * elem);
  for (int side = 0; side < 2; ++side) {
    const uint8_t* src = side == 0 ? k8 : v8;
    for (size_t h = 0; h < H; ++h) {
      // Gather head h's rows [tokens, d] out of [tokens, H, d].
      for (size_t t = 0; t < tokens; ++t)
        std::memcpy(&head_raw[t * d * elem], src + (t * H + h) * d * elem, d * elem);
      Codec codec = (side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))];
      for (const Calibrated& cal : calibrated)
        if (cal.side == side && cal.head == h) codec = cal.codec;
      auto& out = records[size_t(side) * H + h];
      out.resize(tokens * codec.record_bytes());
      try {
        codec.encode(head_raw.data(), type, tokens, out.data());
      } catch (const Error& e) {
        throw Error(append_where(seq, layer, side, h) + e.what());
      }
    }
  }

  // Commit: install newly calibrated codecs, take pages, scatter records into them.
  for (const Calibrated& c2 : calibrated)
    (c2.side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(c2.head))] =
        c2.codec;
  const size_t first_new = s.pages.size();
  for (size_t i = 0; i < extra; ++i) {
    s.pages.push_back(im.free_pages.back());
    im.free_pages.pop_back();
  }
  im.zero_pages(std::span<const uint32_t>(s.pages).subspan(first_new));
  for (int side = 0; side < 2; ++side) {
    const size_t rb = (side == 0 ? im.key_layout : im.value_layout).record_bytes;
    for (size_t h = 0; h < H; ++h)
      for (size_t t = 0; t < tokens; ++t)
        im.store_record(layer, s, int(h), side, old_len + t,
                        records[size_t(side) * H + h].data() + t * rb);
  }
  s.lengths[size_t(layer)] = new_len;
}

void KVCache::Impl::store_record(int layer, const Sequence& s, int head, int side, size_t pos,
                                 const uint8_t* record) {
  const size_t P = size_t(config.page_tokens), slot = pos % P;
  uint8_t* blk = block(layer, s.pages[pos / P], head, side == 1);
  for_each_section(side == 0 ? key_layout : value_layout, [&](const SectionLayout& sec) {
    std::memcpy(blk + sec.block_offset + slot * sec.bytes, record + sec.record_offset, sec.bytes);
  });
}

void KVCache::append_step(int layer, std::span<const SequenceId> seqs, const void* k,
                          const void* v, ScalarType type, StepCheck check) {
  auto& im = *impl_;
  const CacheConfig& c = im.config;
  TQKV_CHECK(check == StepCheck::now || check == StepCheck::deferred,
             "append_step: unknown StepCheck ", int(check));
  const bool deferred = check == StepCheck::deferred && im.on_gpu();
  // Earlier deferred steps first (a refusal among them is this call's error); a deferred step
  // leaves them queued unless the queue is full.
  if (!deferred || im.queued.size() == kQueuedSteps) im.settle();
  im.check_layer(layer, "append_step");
  if (seqs.empty()) return;
  TQKV_CHECK(k != nullptr && v != nullptr, "append_step: null key or value pointer");
  TQKV_CHECK(int(type) <= 2, "append_step: unknown scalar type ", int(type));
  const size_t H = size_t(c.kv_heads), d = size_t(c.head_dim), P = size_t(c.page_tokens);
  const size_t elem = type == ScalarType::f32 ? 4 : 2, B = seqs.size();
  std::vector<SequenceId> sorted(seqs.begin(), seqs.end());
  std::sort(sorted.begin(), sorted.end());
  if (auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end())
    throw Error(detail::concat("append_step: sequence ", *twice, " appears twice in one step"));
  std::vector<Impl::Sequence*> ss;
  size_t extra = 0;  // sequences whose token starts a page
  for (SequenceId id : seqs) {
    Impl::Sequence& s = im.find(id, "append_step");
    TQKV_CHECK(s.lengths[size_t(layer)] < (size_t(1) << 32) - 1, "append_step: sequence ", id,
               " is full");
    extra += s.lengths[size_t(layer)] + 1 > s.pages.size() * P;
    ss.push_back(&s);
  }
  TQKV_CHECK(extra <= im.free_pages.size(), "append_step: out of pages: ", B,
             " sequences need ", extra, " new pages, but only ", im.free_pages.size(), " of ",
             c.max_pages, " are free");
  for (size_t h = 0; h < H; ++h)
    TQKV_CHECK(im.key_codecs[im.codec_index(layer, int(h))].ready() &&
                   im.value_codecs[im.codec_index(layer, int(h))].ready(),
               "append_step: layer ", layer, "'s codecs still choose their outlier channels or "
               "offsets from their first tokens; append each sequence's first tokens (its "
               "prefill) with append");
  const auto* k8 = static_cast<const uint8_t*>(k);
  const auto* v8 = static_cast<const uint8_t*>(v);
  // A page for each sequence whose token starts one (zeroed; on a GPU, its page-table entry
  // uploaded); first_new[i]: sequence i's page count before.
  std::vector<size_t> first_new(B);
  auto take_pages = [&] {
    for (size_t i = 0; i < B; ++i) {
      Impl::Sequence& s = *ss[i];
      first_new[i] = s.pages.size();
      if (s.lengths[size_t(layer)] + 1 <= s.pages.size() * P) continue;
      s.pages.push_back(im.free_pages.back());
      im.free_pages.pop_back();
      im.zero_pages(std::span<const uint32_t>(s.pages).subspan(first_new[i]));
      if (im.on_gpu()) im.upload_pages(s, first_new[i]);
    }
  };
  if (!im.on_gpu()) {
    // Encode every vector first (this validates them, in the GPU's order: side, head,
    // sequence), then take pages and store the records.
    std::vector<std::vector<uint8_t>> records(2 * H);
    for (int side = 0; side < 2; ++side)
      for (size_t h = 0; h < H; ++h) {
        const Codec& codec =
            (side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))];
        const size_t rb = (side == 0 ? im.key_layout : im.value_layout).record_bytes;
        auto& out = records[size_t(side) * H + h];
        out.resize(B * rb);
        for (size_t i = 0; i < B; ++i) {
          try {
            codec.encode((side == 0 ? k8 : v8) + (i * H + h) * d * elem, type, 1, &out[i * rb]);
          } catch (const Error& e) {
            throw Error(append_where(seqs[i], layer, side, h) +
                        as_token(e.what(), ss[i]->lengths[size_t(layer)]));
          }
        }
      }
    take_pages();
    for (size_t i = 0; i < B; ++i) {
      size_t& length = ss[i]->lengths[size_t(layer)];
      for (int side = 0; side < 2; ++side) {
        const size_t rb = (side == 0 ? im.key_layout : im.value_layout).record_bytes;
        for (size_t h = 0; h < H; ++h)
          im.store_record(layer, *ss[i], int(h), side, length,
                          records[size_t(side) * H + h].data() + i * rb);
      }
      ++length;
    }
    return;
  }
  // GPU: the new pages first, then one launch per kMaxLaunchBatch sequences, which also write
  // the new lengths on the device; one wait.
  take_pages();
  auto undo = [&] {
    for (size_t i = 0; i < B; ++i) {
      Impl::Sequence& s = *ss[i];
      for (size_t j = s.pages.size(); j > first_new[i]; --j)
        im.free_pages.push_back(s.pages[j - 1]);
      s.pages.resize(first_new[i]);
      im.upload_lengths(s);
    }
  };
  gpu::AppendParams p;
  p.cache = im.view(layer);
  p.type = int(type);
  p.step = 1;
  p.step_total = uint32_t(B);
  p.lengths = im.gpu->lengths.as<uint32_t>();
  const size_t q = im.queued.size();  // a deferred step's flag word
  p.first_invalid = deferred ? im.gpu->step_flags.as<uint32_t>() + q : im.gpu->flag.as<uint32_t>();
  uint32_t first_invalid = 0xffffffffu;
  try {
    for (size_t i0 = 0; i0 < B; i0 += gpu::kMaxLaunchBatch) {
      const size_t n = std::min(B - i0, size_t(gpu::kMaxLaunchBatch));
      p.k = k8 + i0 * H * d * elem;
      p.v = v8 + i0 * H * d * elem;
      p.tokens = uint32_t(n);
      p.step_base = uint32_t(i0);
      for (size_t i = 0; i < n; ++i) {
        p.step_slot[i] = ss[i0 + i]->slot;
        p.step_position[i] = uint32_t(ss[i0 + i]->lengths[size_t(layer)]);
      }
      gpu::launch_append(c.device, p, im.gpu->stream);
    }
    if (deferred) {
      gpu::record_event(c.device, im.gpu->queued_done.get(), im.gpu->stream);  // the queue's end
    } else {
      first_invalid = im.read_flag();
    }
  } catch (...) {
    undo();  // a CUDA error: undo, then rethrow
    if (deferred) {
      // Launches queued before the error may still lower the step's word: reset it behind them.
      try {
        gpu::fill(c.device, p.first_invalid, 0xff, 4, im.gpu->stream);
      } catch (...) {
      }
    }
    throw;
  }
  if (first_invalid != 0xffffffffu) {
    undo();
    const size_t i = first_invalid % B, h = (first_invalid / B) % H;
    const int side = int(first_invalid / (B * H));
    const Codec& used =
        (side == 0 ? im.key_codecs : im.value_codecs)[im.codec_index(layer, int(h))];
    throw_refused(im, seqs[i], layer, side, h, used, side == 0 ? k : v, i,
                  ss[i]->lengths[size_t(layer)], type);
  }
  if (deferred) {
    Impl::QueuedStep step{layer, std::vector<SequenceId>(seqs.begin(), seqs.end()), {}};
    for (size_t i = 0; i < B; ++i) step.took_page.push_back(ss[i]->pages.size() > first_new[i]);
    im.queued.push_back(std::move(step));
  }
  for (Impl::Sequence* s : ss) ++s->lengths[size_t(layer)];
}

void KVCache::check() { impl_->settle(); }

void KVCache::Impl::settle() {
  if (queued.empty()) return;
  gpu::wait_event(gpu->queued_done.get());
  uint32_t* flags = gpu->step_flags_host.get();
  gpu::download(config.device, flags, gpu->step_flags.data(), 4 * queued.size(), gpu->stream);
  size_t bad = 0;
  while (bad < queued.size() && flags[bad] == 0xffffffffu) ++bad;
  if (bad == queued.size()) {
    queued.clear();
    return;
  }
  // Undo the refused step and every one after it, the last first: a token less in each of
  // their sequences' layer, and the pages they took back to the pool. The device lengths, which
  // the kernels raised, are uploaded again; the flag words reset for the next queue.
  const QueuedStep refused = queued[bad];
  const uint32_t first_invalid = flags[bad];
  const size_t after = queued.size() - bad - 1;
  std::vector<SequenceId> touched;
  for (size_t j = queued.size(); j-- > bad;) {
    const QueuedStep& st = queued[j];
    for (size_t i = 0; i < st.seqs.size(); ++i) {
      Sequence& s = sequences.at(st.seqs[i]);
      --s.lengths[size_t(st.layer)];
      if (st.took_page[i]) {
        free_pages.push_back(s.pages.back());
        s.pages.pop_back();
      }
      touched.push_back(st.seqs[i]);
    }
  }
  queued.clear();
  gpu::fill(config.device, gpu->step_flags.data(), 0xff, kQueuedSteps * 4, gpu->stream);
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  for (SequenceId id : touched) upload_lengths(sequences.at(id));
  // The vector order of AppendParams::first_invalid: side, then head, then the step's sequence.
  const size_t B = refused.seqs.size(), H = size_t(config.kv_heads);
  const size_t i = first_invalid % B, h = (first_invalid / B) % H;
  const int side = int(first_invalid / (B * H));
  const SequenceId seq = refused.seqs[i];
  throw Error(append_where(seq, refused.layer, side, h) +
              detail::concat("token ", sequences.at(seq).lengths[size_t(refused.layer)],
                             " of a deferred append_step cannot be encoded (a non-finite element, "
                             "or a norm outside the norms' range); that step and the ", after,
                             " queued after it were undone"));
}

void KVCache::truncate(SequenceId seq, size_t tokens) {
  auto& im = *impl_;
  im.settle();
  Impl::Sequence& s = im.find(seq, "truncate");
  const size_t shortest = *std::min_element(s.lengths.begin(), s.lengths.end());
  TQKV_CHECK(tokens <= shortest, "truncate: cannot remove ", tokens, " tokens from sequence ",
             seq, ", which holds ", shortest, " in its shortest layer");
  for (size_t& n : s.lengths) n -= tokens;
  im.release_pages_beyond(s);
  if (im.on_gpu()) im.upload_lengths(s);
}

void KVCache::truncate_layer(SequenceId seq, int layer, size_t tokens) {
  auto& im = *impl_;
  im.settle();
  im.check_layer(layer, "truncate_layer");
  Impl::Sequence& s = im.find(seq, "truncate_layer");
  size_t& n = s.lengths[size_t(layer)];
  TQKV_CHECK(tokens <= n, "truncate_layer: cannot remove ", tokens, " tokens from layer ", layer,
             " of sequence ", seq, ", which holds ", n);
  n -= tokens;
  im.release_pages_beyond(s);
  if (im.on_gpu()) im.upload_lengths(s);
}

void KVCache::free_sequence(SequenceId seq) {
  auto& im = *impl_;
  im.settle();
  Impl::Sequence& s = im.find(seq, "free_sequence");
  std::fill(s.lengths.begin(), s.lengths.end(), 0);
  im.release_pages_beyond(s);
  if (im.on_gpu()) {
    im.upload_lengths(s);
    im.gpu->free_slots.push_back(s.slot);
  }
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
  std::vector<uint8_t> host_block;  // GPU caches: the block being read, copied once
  size_t host_page = SIZE_MAX;
  for (size_t i = 0; i < count; ++i) {
    const size_t pos = first + i;
    const uint8_t* blk = im.block(layer, s.pages[pos / P], head, values);
    if (im.on_gpu()) {
      if (host_page != pos / P) {
        host_block.resize(layout.block_bytes);
        gpu::download(im.config.device, host_block.data(), blk, layout.block_bytes,
                      im.gpu->stream);
        host_page = pos / P;
      }
      blk = host_block.data();
    }
    uint8_t* rec = records + i * layout.record_bytes;
    for_each_section(layout, [&](const SectionLayout& sec) {
      std::memcpy(rec + sec.record_offset, blk + sec.block_offset + (pos % P) * sec.bytes,
                  sec.bytes);
    });
  }
}

// --- files ---------------------------------------------------------------------------------------

std::vector<uint8_t> KVCache::serialize() const {
  impl_->settle();
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
  // GPU caches: each layer's pages up to the highest in use, copied to the host once.
  uint32_t pages_used = 0;
  for (const auto& [id, s] : im.sequences)
    for (uint32_t page : s.pages) pages_used = std::max(pages_used, page + 1);
  std::vector<std::vector<uint8_t>> host_pools(im.on_gpu() ? size_t(im.config.layers) : 0);
  for (size_t l = 0; l < host_pools.size(); ++l) {
    host_pools[l].resize(size_t(pages_used) * im.layer_page_bytes);
    gpu::download(im.config.device, host_pools[l].data(), im.pools[l].data(),
                  host_pools[l].size(), im.gpu->stream);
  }
  uint8_t* out = saved.payload.data();
  for (const auto& [id, s] : im.sequences)
    for (uint32_t page : s.pages)
      for (int l = 0; l < im.config.layers; ++l, out += im.layer_page_bytes) {
        const uint8_t* pool = im.on_gpu() ? host_pools[size_t(l)].data() : im.pools[size_t(l)].data();
        std::memcpy(out, pool + size_t(page) * im.layer_page_bytes, im.layer_page_bytes);
      }
  return file::serialize_cache(saved);
}

void KVCache::save(const std::filesystem::path& path) const {
  file::write_bytes(path, serialize());
}

KVCache KVCache::parse(std::span<const uint8_t> bytes, std::string_view name, size_t max_pages,
                       Device device) {
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
  config.device = device;
  config.max_sequences = std::max(config.max_sequences, saved.sequences.size());
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
      // Equal but for what each (layer, head) chose itself where the configuration left it open.
      CodecSpec a = specs[i], b = base;
      a.outlier_channels.clear();
      b.outlier_channels.clear();
      a.offset.clear();
      b.offset.clear();
      TQKV_CHECK(a == b &&
                     (base.outlier_channels.empty() ||
                      specs[i].outlier_channels == base.outlier_channels) &&
                     (base.offset.empty() || specs[i].offset == base.offset),
                 name, ": codec ", i, " does not match the cache's ",
                 side == 0 ? "key" : "value", " codec");
      try {
        codecs[i] = Codec(specs[i]);
      } catch (const Error& e) {
        throw Error(detail::concat(name, ": codec ", i, ": ", e.what()));
      }
    }
  }
  if (im.on_gpu())
    for (int l = 0; l < config.layers; ++l)
      for (int h = 0; h < config.kv_heads; ++h)
        for (int side = 0; side < 2; ++side) im.upload_channels(l, h, side);
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
                   " but the codecs of that layer have not chosen their outlier channels or "
                   "offsets");
    }
    TQKV_CHECK(ss.pages == (longest + P - 1) / P, name, ": sequence ", ss.id, " has ", ss.pages,
               " pages for ", longest, " tokens of ", P, " per page");
    TQKV_CHECK(ss.id < saved.next_id, name, ": sequence id ", ss.id, " is not below next_id ",
               saved.next_id);
    Impl::Sequence s{{}, std::vector<size_t>(ss.lengths.begin(), ss.lengths.end()), 0};
    for (uint64_t i = 0; i < ss.pages; ++i) {
      const uint32_t page = im.free_pages.back();
      im.free_pages.pop_back();
      for (int l = 0; l < config.layers; ++l, in += im.layer_page_bytes) {
        uint8_t* at = im.pools[size_t(l)].data() + size_t(page) * im.layer_page_bytes;
        if (im.on_gpu()) {
          gpu::upload(device, at, in, im.layer_page_bytes, im.gpu->stream);
        } else {
          std::memcpy(at, in, im.layer_page_bytes);
        }
      }
      s.pages.push_back(page);
    }
    if (im.on_gpu()) {
      s.slot = im.gpu->free_slots.back();
      im.gpu->free_slots.pop_back();
      im.upload_pages(s, 0);
      im.upload_lengths(s);
    }
    TQKV_CHECK(im.sequences.emplace(ss.id, std::move(s)).second, name, ": sequence id ", ss.id,
               " appears twice");
  }
  im.next_id = saved.next_id;
  return std::move(*cache);
}

KVCache KVCache::load(const std::filesystem::path& path, size_t max_pages, Device device) {
  return parse(file::read_bytes(path), path.string(), max_pages, device);
}

}  // namespace tqkv
