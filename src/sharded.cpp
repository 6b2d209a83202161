// The sharded cache (sharded.hpp): placement of tokens or heads on shards, appends routed to
// them, and the decode step's partial states, collective and merge.
#include "tqkv/sharded.hpp"

#include <algorithm>
#include <cstring>
#include <map>

#include "cuda/backend.hpp"
#include "tqkv/error.hpp"

namespace tqkv {

namespace {

size_t element_bytes(ScalarType type) { return type == ScalarType::f32 ? 4 : 2; }

}  // namespace

struct ShardedCache::Impl {
  ShardedConfig config;
  bool gpu = false;
  std::vector<KVCache> shards;
  std::vector<Range> heads;  // per shard
  struct Sequence {
    std::vector<SequenceId> ids;  // per shard
    size_t share = 0;             // sequence placement: S (0 until the first append)
  };
  std::map<SequenceId, Sequence> sequences;
  SequenceId next_id = 0;
  // Decode resources, grown on demand: per GPU shard a workspace, its states and the gathered
  // states (CPU shards: host vectors of their states, which the merge reads in place).
  std::unique_ptr<gpu::Collective> collective;
  std::vector<std::unique_ptr<GpuWorkspace>> workspaces;
  std::vector<DeviceBuffer> states, gathered, staging;
  std::vector<std::vector<float>> host_states;

  Sequence& find(SequenceId id, const char* what) {
    auto it = sequences.find(id);
    TQKV_CHECK(it != sequences.end(), what, ": sequence ", id, " does not exist");
    return it->second;
  }
  const Sequence& find(SequenceId id, const char* what) const {
    return const_cast<Impl*>(this)->find(id, what);
  }
  int world() const { return int(shards.size()); }
  // Sequence placement: the first token of shard r's share [r·S, (r+1)·S) and one past its
  // last (none for the last shard).
  std::pair<size_t, size_t> share_range(int r, size_t share) const {
    const size_t first = size_t(r) * share;
    return {first, r == world() - 1 ? SIZE_MAX : first + share};
  }
};

ShardedCache::ShardedCache(ShardedConfig config) : impl_(std::make_unique<Impl>()) {
  auto& im = *impl_;
  const std::vector<Device>& devices = config.devices;
  TQKV_CHECK(!devices.empty(), "ShardedCache: no devices given (one shard per device)");
  im.gpu = devices[0].is_cuda();
  for (size_t r = 0; r < devices.size(); ++r) {
    TQKV_CHECK(devices[r].is_cuda() == im.gpu, "ShardedCache: shard ", r, " is on ",
               to_string(devices[r]), " but shard 0 on ", to_string(devices[0]),
               "; the shards are all CPU (simulated ranks) or all GPUs");
    for (size_t o = 0; o < r && im.gpu; ++o)
      TQKV_CHECK(devices[o] != devices[r], "ShardedCache: ", to_string(devices[r]),
                 " is given twice (one shard per GPU)");
  }
  const int world = int(devices.size());
  const CacheConfig& c = config.cache;
  TQKV_CHECK(c.kv_heads >= 1, "ShardedCache: kv_heads must be positive, got ", c.kv_heads);
  if (config.placement == Placement::heads) {
    TQKV_CHECK(world <= c.kv_heads, "ShardedCache: head placement over ", world,
               " shards needs at least as many KV heads, the cache has ", c.kv_heads);
    TQKV_CHECK(config.share_tokens == 0, "ShardedCache: share_tokens is for sequence placement");
  } else {
    TQKV_CHECK(config.placement == Placement::sequence, "ShardedCache: unknown placement ",
               int(config.placement));
    TQKV_CHECK(c.page_tokens > 0 && config.share_tokens % size_t(c.page_tokens) == 0,
               "ShardedCache: share_tokens (", config.share_tokens, ") must be a multiple of ",
               "page_tokens (", c.page_tokens, ")");
    TQKV_CHECK(config.share_tokens <= (size_t(1) << 40), "ShardedCache: share_tokens (",
               config.share_tokens, ") is beyond any sequence (at most 2^40)");
  }
  for (int r = 0; r < world; ++r) {
    Range h{0, size_t(c.kv_heads)};
    if (config.placement == Placement::heads) {
      const size_t H = size_t(c.kv_heads), W = size_t(world), R = size_t(r);
      h = {R * (H / W) + std::min(R, H % W), H / W + (R < H % W ? 1 : 0)};
    }
    im.heads.push_back(h);
    CacheConfig shard = c;
    shard.kv_heads = int(h.count);
    shard.device = devices[size_t(r)];
    im.shards.emplace_back(shard);
  }
  if (im.gpu) {
    im.collective = gpu::make_nccl_collective(devices.data(), world);
    for (const KVCache& shard : im.shards)
      im.workspaces.push_back(std::make_unique<GpuWorkspace>(shard));
  }
  im.states.resize(size_t(world));
  im.gathered.resize(size_t(world));
  im.staging.resize(size_t(world));
  im.host_states.resize(size_t(world));
  im.config = std::move(config);
}

ShardedCache::~ShardedCache() = default;
ShardedCache::ShardedCache(ShardedCache&&) noexcept = default;
ShardedCache& ShardedCache::operator=(ShardedCache&&) noexcept = default;

const ShardedConfig& ShardedCache::config() const { return impl_->config; }
int ShardedCache::world() const { return impl_->world(); }

KVCache& ShardedCache::shard(int rank) {
  TQKV_CHECK(rank >= 0 && rank < world(), "ShardedCache: rank ", rank, " is outside 0..",
             world() - 1);
  return impl_->shards[size_t(rank)];
}
const KVCache& ShardedCache::shard(int rank) const {
  return const_cast<ShardedCache*>(this)->shard(rank);
}

ShardedCache::Range ShardedCache::heads_of(int rank) const {
  shard(rank);
  return impl_->heads[size_t(rank)];
}

ShardedCache::Range ShardedCache::tokens_of(int rank, SequenceId seq, int layer) const {
  const Impl::Sequence& s = impl_->find(seq, "tokens_of");
  const size_t n = shard(rank).length(s.ids[size_t(rank)], layer);
  if (impl_->config.placement == Placement::heads) return {0, n};
  return {n == 0 ? 0 : impl_->share_range(rank, s.share).first, n};  // shares fill in order
}

SequenceId ShardedCache::add_sequence() {
  auto& im = *impl_;
  Impl::Sequence s;
  try {
    for (KVCache& shard : im.shards) s.ids.push_back(shard.add_sequence());
  } catch (...) {
    for (size_t r = 0; r < s.ids.size(); ++r) im.shards[r].free_sequence(s.ids[r]);
    throw;
  }
  if (im.config.placement == Placement::sequence) s.share = im.config.share_tokens;
  const SequenceId id = im.next_id++;
  im.sequences[id] = std::move(s);
  return id;
}

bool ShardedCache::contains(SequenceId seq) const { return impl_->sequences.count(seq) > 0; }

size_t ShardedCache::length(SequenceId seq, int layer) const {
  const Impl::Sequence& s = impl_->find(seq, "length");
  if (impl_->config.placement == Placement::heads) return shard(0).length(s.ids[0], layer);
  size_t n = 0;
  for (int r = 0; r < world(); ++r) n += shard(r).length(s.ids[size_t(r)], layer);
  return n;
}

void ShardedCache::free_sequence(SequenceId seq) {
  Impl::Sequence& s = impl_->find(seq, "free_sequence");
  for (int r = 0; r < world(); ++r) shard(r).free_sequence(s.ids[size_t(r)]);
  impl_->sequences.erase(seq);
}

// The checks append and append_step share: the layer, one key and one value pointer a shard,
// the scalar type.
static void check_append_call(const char* what, const CacheConfig& c, int layer, size_t W,
                              std::span<const void* const> k, std::span<const void* const> v,
                              ScalarType type) {
  TQKV_CHECK(layer >= 0 && layer < c.layers, what, ": layer ", layer, " is outside 0..",
             c.layers - 1);
  TQKV_CHECK(k.size() == W && v.size() == W, what, ": ", k.size(), " key and ", v.size(),
             " value pointers for ", W, " shards (one of each per shard)");
  TQKV_CHECK(int(type) <= 2, what, ": unknown scalar type ", int(type));
}

void ShardedCache::append(SequenceId seq, int layer, std::span<const void* const> k,
                          std::span<const void* const> v, size_t tokens, ScalarType type) {
  auto& im = *impl_;
  Impl::Sequence& s = im.find(seq, "append");
  const CacheConfig& c = im.config.cache;
  const size_t W = size_t(world());
  check_append_call("append", c, layer, W, k, v, type);
  if (tokens == 0) return;
  const size_t H = size_t(c.kv_heads), d = size_t(c.head_dim), P = size_t(c.page_tokens);
  const size_t row = H * d * element_bytes(type);  // bytes of one token's keys (or values)
  // Each shard's part: sequence placement, a token range [first, first + count) of the input
  // (share chosen at the first append where not given); head placement, every token.
  size_t share = s.share;
  if (im.config.placement == Placement::sequence && share == 0)
    share = std::max(P, ((tokens + W - 1) / W + P - 1) / P * P);
  const size_t before = length(seq, layer);
  std::vector<Range> part(W);
  for (size_t r = 0; r < W; ++r) {
    if (im.config.placement == Placement::heads) {
      part[r] = {0, tokens};
      continue;
    }
    const auto [first, end] = im.share_range(int(r), share);
    const size_t lo = std::max(before, first), hi = std::min(before + tokens, end);
    part[r] = {lo - before, hi > lo ? hi - lo : 0};
  }
  // Pages first, on every shard: nothing is stored where one shard is short of them.
  for (size_t r = 0; r < W; ++r) {
    if (part[r].count == 0) continue;
    TQKV_CHECK(k[r] != nullptr && v[r] != nullptr, "append: null key or value pointer for shard ",
               r);
    KVCache& sh = im.shards[r];
    const SequenceId id = s.ids[r];
    const size_t held = sh.page_table(id).size();
    const size_t needed = (sh.length(id, layer) + part[r].count + P - 1) / P;
    const size_t extra = needed > held ? needed - held : 0;
    TQKV_CHECK(extra <= sh.pages_free(), "append: out of pages on shard ", r, ": ",
               part[r].count, " more tokens of sequence ", seq, " need ", extra,
               " new pages, but only ", sh.pages_free(), " are free");
  }
  std::vector<size_t> done;
  try {
    for (size_t r = 0; r < W; ++r) {
      if (part[r].count == 0) continue;
      KVCache& sh = im.shards[r];
      const size_t offset = part[r].first * row;
      const auto* kr = static_cast<const uint8_t*>(k[r]) + offset;
      const auto* vr = static_cast<const uint8_t*>(v[r]) + offset;
      const Range h = im.heads[r];
      if (h.count == H) {
        sh.append(s.ids[r], layer, kr, vr, part[r].count, type);
      } else {
        // The shard's heads of every token, packed: [count][heads][d].
        const size_t width = h.count * d * element_bytes(type);
        const size_t skip = h.first * d * element_bytes(type);
        const size_t n = part[r].count;
        if (im.gpu) {
          DeviceBuffer& buf = im.staging[r];
          if (buf.bytes() < 2 * n * width) buf = DeviceBuffer(sh.device(), 2 * n * width);
          uint8_t* kp = buf.as<uint8_t>();
          uint8_t* vp = kp + n * width;
          gpu::copy_2d(sh.device(), kp, width, kr + skip, row, width, n, sh.stream());
          gpu::copy_2d(sh.device(), vp, width, vr + skip, row, width, n, sh.stream());
          sh.append(s.ids[r], layer, kp, vp, n, type);
        } else {
          std::vector<uint8_t> packed(2 * n * width);
          for (size_t t = 0; t < n; ++t) {
            std::memcpy(&packed[t * width], kr + t * row + skip, width);
            std::memcpy(&packed[(n + t) * width], vr + t * row + skip, width);
          }
          sh.append(s.ids[r], layer, packed.data(), packed.data() + n * width, n, type);
        }
      }
      done.push_back(r);
    }
  } catch (...) {
    for (size_t r : done) im.shards[r].truncate_layer(s.ids[r], layer, part[r].count);
    throw;
  }
  s.share = share;
}

void ShardedCache::append_step(int layer, std::span<const SequenceId> seqs,
                               std::span<const void* const> k, std::span<const void* const> v,
                               ScalarType type) {
  auto& im = *impl_;
  const CacheConfig& c = im.config.cache;
  const size_t W = size_t(world());
  check_append_call("append_step", c, layer, W, k, v, type);
  if (seqs.empty()) return;
  const size_t B = seqs.size(), H = size_t(c.kv_heads), d = size_t(c.head_dim);
  const size_t P = size_t(c.page_tokens), row = H * d * element_bytes(type);
  std::vector<SequenceId> sorted(seqs.begin(), seqs.end());
  std::sort(sorted.begin(), sorted.end());
  if (auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end())
    throw Error(detail::concat("append_step: sequence ", *twice, " appears twice in one step"));
  // Each shard's rows of the step: sequence placement, the sequences whose token falls in its
  // share (a sequence's first token chooses the share an append of one token would); head
  // placement, every sequence, its heads.
  std::vector<Impl::Sequence*> ss;
  std::vector<size_t> shares(B);
  std::vector<std::vector<size_t>> rows(W);
  for (size_t i = 0; i < B; ++i) {
    Impl::Sequence& s = im.find(seqs[i], "append_step");
    ss.push_back(&s);
    if (im.config.placement == Placement::heads) {
      for (size_t r = 0; r < W; ++r) rows[r].push_back(i);
      continue;
    }
    shares[i] = s.share != 0 ? s.share : P;
    rows[std::min(W - 1, length(seqs[i], layer) / shares[i])].push_back(i);
  }
  // Pages first, on every shard: nothing is stored where one shard is short of them.
  for (size_t r = 0; r < W; ++r) {
    if (rows[r].empty()) continue;
    TQKV_CHECK(k[r] != nullptr && v[r] != nullptr,
               "append_step: null key or value pointer for shard ", r);
    const KVCache& sh = im.shards[r];
    size_t extra = 0;
    for (size_t i : rows[r]) {
      const SequenceId id = ss[i]->ids[r];
      extra += sh.length(id, layer) + 1 > sh.page_table(id).size() * P;
    }
    TQKV_CHECK(extra <= sh.pages_free(), "append_step: out of pages on shard ", r, ": ",
               rows[r].size(), " sequences need ", extra, " new pages, but only ",
               sh.pages_free(), " are free");
  }
  std::vector<size_t> done;
  std::vector<uint8_t> packed;
  try {
    for (size_t r = 0; r < W; ++r) {
      if (rows[r].empty()) continue;
      KVCache& sh = im.shards[r];
      std::vector<SequenceId> ids;
      for (size_t i : rows[r]) ids.push_back(ss[i]->ids[r]);
      const Range h = im.heads[r];
      const size_t width = h.count * d * element_bytes(type);
      const size_t skip = h.first * d * element_bytes(type);
      const auto* kr = static_cast<const uint8_t*>(k[r]);
      const auto* vr = static_cast<const uint8_t*>(v[r]);
      const size_t n = rows[r].size();
      if (n == B && width == row) {  // every row, whole: the input as it is
        sh.append_step(layer, ids, kr, vr, type);
      } else if (im.gpu) {
        // The shard's rows and heads, packed [n][heads][d]: one copy a run of consecutive rows.
        DeviceBuffer& buf = im.staging[r];
        if (buf.bytes() < 2 * n * width) buf = DeviceBuffer(sh.device(), 2 * n * width);
        uint8_t* kp = buf.as<uint8_t>();
        uint8_t* vp = kp + n * width;
        for (size_t a = 0; a < n;) {
          size_t b = a + 1;
          while (b < n && rows[r][b] == rows[r][b - 1] + 1) ++b;
          const size_t from = rows[r][a] * row + skip;
          gpu::copy_2d(sh.device(), kp + a * width, width, kr + from, row, width, b - a,
                       sh.stream());
          gpu::copy_2d(sh.device(), vp + a * width, width, vr + from, row, width, b - a,
                       sh.stream());
          a = b;
        }
        sh.append_step(layer, ids, kp, vp, type);
      } else {
        packed.resize(2 * n * width);
        for (size_t a = 0; a < n; ++a) {
          std::memcpy(&packed[a * width], kr + rows[r][a] * row + skip, width);
          std::memcpy(&packed[(n + a) * width], vr + rows[r][a] * row + skip, width);
        }
        sh.append_step(layer, ids, packed.data(), packed.data() + n * width, type);
      }
      done.push_back(r);
    }
  } catch (...) {
    for (size_t r : done)
      for (size_t i : rows[r]) im.shards[r].truncate_layer(ss[i]->ids[r], layer, 1);
    throw;
  }
  if (im.config.placement == Placement::sequence)
    for (size_t i = 0; i < B; ++i) ss[i]->share = shares[i];
}

void ShardedCache::attend_decode(int layer, std::span<const SequenceId> seqs,
                                 std::span<const float* const> q, int q_heads,
                                 std::span<float* const> out, const AttentionOptions& options) {
  auto& im = *impl_;
  const size_t W = size_t(world());
  TQKV_CHECK(q.size() == W && out.size() == W, "attend_decode: ", q.size(), " query and ",
             out.size(), " output pointers for ", W, " shards (one of each per shard)");
  const CacheConfig& c = im.config.cache;
  TQKV_CHECK(q_heads >= 1 && q_heads % c.kv_heads == 0, "attend_decode: q_heads (", q_heads,
             ") must be a positive multiple of kv_heads (", c.kv_heads, ")");
  for (size_t r = 0; r < W && !seqs.empty(); ++r)
    TQKV_CHECK(q[r] != nullptr && out[r] != nullptr, "attend_decode: null query or output "
               "pointer for shard ", r);
  const int R = q_heads / c.kv_heads;
  // Per shard, its own ids of the sequences.
  std::vector<std::vector<SequenceId>> ids(W);
  for (SequenceId id : seqs) {
    const Impl::Sequence& s = im.find(id, "attend_decode");
    for (size_t r = 0; r < W; ++r) ids[r].push_back(s.ids[r]);
  }
  // Every query row needs a token of its sequence (on some shard) to attend to.
  for (size_t b = 0; b < seqs.size(); ++b)
    TQKV_CHECK(length(seqs[b], layer) > 0, "attend_decode: sequence ", seqs[b],
               " holds no tokens at layer ", layer);
  if (im.config.placement == Placement::heads) {  // each shard its own heads, no communication
    for (size_t r = 0; r < W; ++r) {
      const int heads = R * int(im.heads[r].count);
      if (im.gpu)
        tqkv::attend_decode(im.shards[r], layer, ids[r], q[r], heads, out[r], *im.workspaces[r],
                            im.shards[r].stream(), options);
      else
        tqkv::attend_decode(im.shards[r], layer, ids[r], q[r], heads, out[r], options);
    }
    return;
  }
  // Sequence placement: partial states per shard, gathered on every shard, merged.
  const size_t d = size_t(c.head_dim);
  const size_t rows = seqs.size() * size_t(q_heads), count = rows * (4 + d);
  if (rows == 0) return;
  std::vector<const float*> send(W);
  std::vector<float*> recv(W);
  if (!im.gpu) {
    for (size_t r = 0; r < W; ++r) {
      im.host_states[r].resize(count);
      attend_partial(im.shards[r], layer, ids[r], q[r], q_heads, im.host_states[r].data(),
                     options);
      send[r] = im.host_states[r].data();
    }
    // Simulated ranks share the host's memory: the merge reads every shard's states in place.
    merge_partial_states(send, rows, int(d), out[0]);
    for (size_t r = 1; r < W; ++r)
      if (out[r] != out[0]) std::memcpy(out[r], out[0], rows * d * 4);
    return;
  }
  std::vector<CudaStream> streams(W);
  for (size_t r = 0; r < W; ++r) {
    KVCache& sh = im.shards[r];
    streams[r] = sh.stream();
    if (im.states[r].bytes() < count * 4) {
      im.states[r] = DeviceBuffer(sh.device(), count * 4);
      im.gathered[r] = DeviceBuffer(sh.device(), W * count * 4);
    }
    attend_partial(sh, layer, ids[r], q[r], q_heads, im.states[r].as<float>(), *im.workspaces[r],
                   streams[r], options);
    send[r] = im.states[r].as<float>();
    recv[r] = im.gathered[r].as<float>();
  }
  im.collective->all_gather(send.data(), recv.data(), count, streams.data());
  for (size_t r = 0; r < W; ++r)
    merge_partial_states(im.shards[r].device(), recv[r], int(W), rows, int(d), out[r],
                         streams[r]);
}

}  // namespace tqkv
