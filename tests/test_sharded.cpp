// Sharded caches on simulated ranks (CPU shards): placement of tokens and heads, codes equal to a
// single cache's, decode through partial states and their merge against the float64 reference of
// one cache holding the same codes, and bad input refused without changing anything.
#include "tqkv/sharded.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.hpp"
#include "tqkv/error.hpp"

namespace tqkv {
namespace {

using namespace testing;  // NOLINT: the shared test helpers

// The sharded decode merges float32 states of float32 attention over the same codes; the
// reference is float64 over those codes (as the attention tests' tolerance).
constexpr double kTolerance = 1e-5;

CacheConfig base_config(int kv_heads, int head_dim, double bits) {
  CacheConfig c;
  c.layers = 2;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.key.bits = c.value.bits = bits;
  c.key.seed = 11;
  c.value.seed = 12;
  c.page_tokens = 16;
  c.max_pages = 256;
  return c;
}

ShardedConfig sharded(const CacheConfig& c, int world, Placement placement, size_t share = 0) {
  ShardedConfig s;
  s.cache = c;
  s.devices.assign(size_t(world), Device::cpu());
  s.placement = placement;
  s.share_tokens = share;
  return s;
}

// The same appends to a sharded cache and to one cache: `chunks` appends per sequence.
struct Pair {
  ShardedCache sharded;
  KVCache single;
  std::vector<SequenceId> sseqs, seqs;
};

void fill(Pair& p, std::mt19937_64& rng, const std::vector<std::vector<size_t>>& chunks) {
  const CacheConfig& c = p.single.config();
  const size_t row = size_t(c.kv_heads) * size_t(c.head_dim);
  for (const auto& parts : chunks) {
    p.sseqs.push_back(p.sharded.add_sequence());
    p.seqs.push_back(p.single.add_sequence());
    for (size_t n : parts)
      for (int layer = 0; layer < c.layers; ++layer) {
        const std::vector<float> k = gaussian(rng, n * row, 1.0f, 0.5f), v = gaussian(rng, n * row);
        const std::vector<const void*> ks(size_t(p.sharded.world()), k.data());
        const std::vector<const void*> vs(size_t(p.sharded.world()), v.data());
        p.sharded.append(p.sseqs.back(), layer, ks, vs, n);
        p.single.append(p.seqs.back(), layer, k.data(), v.data(), n);
      }
  }
}

TEST(Sharded, PlacesTokensAndHeads) {
  std::mt19937_64 rng(fresh_seed());
  const CacheConfig c = base_config(5, 64, 4);
  {  // a given share: 64 tokens a shard, the last takes the rest
    Pair p{ShardedCache(sharded(c, 3, Placement::sequence, 64)), KVCache(c), {}, {}};
    fill(p, rng, {{50, 1, 100, 49}});
    const SequenceId id = p.sseqs[0];
    EXPECT_EQ(p.sharded.length(id, 1), 200u);
    const size_t first[] = {0, 64, 128}, count[] = {64, 64, 72};
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(p.sharded.tokens_of(r, id, 1).first, first[r]) << r;
      EXPECT_EQ(p.sharded.tokens_of(r, id, 1).count, count[r]) << r;
      EXPECT_EQ(p.sharded.heads_of(r).count, 5u);
    }
  }
  {  // chosen at the first append: 100 tokens over 4 shards in whole 16-token pages, then decode
    Pair p{ShardedCache(sharded(c, 4, Placement::sequence)), KVCache(c), {}, {}};
    fill(p, rng, {{100, 1, 1}, {3}});
    const size_t count[] = {32, 32, 32, 6};
    for (int r = 0; r < 4; ++r) EXPECT_EQ(p.sharded.tokens_of(r, p.sseqs[0], 0).count, count[r]);
    // A short sequence: one page on the first shard, none elsewhere.
    EXPECT_EQ(p.sharded.tokens_of(0, p.sseqs[1], 0).count, 3u);
    for (int r = 1; r < 4; ++r) EXPECT_EQ(p.sharded.tokens_of(r, p.sseqs[1], 0).count, 0u);
  }
  {  // heads: 5 over 3 shards as 2 + 2 + 1, every token on each
    Pair p{ShardedCache(sharded(c, 3, Placement::heads)), KVCache(c), {}, {}};
    fill(p, rng, {{30}});
    const size_t first[] = {0, 2, 4}, count[] = {2, 2, 1};
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(p.sharded.heads_of(r).first, first[r]);
      EXPECT_EQ(p.sharded.heads_of(r).count, count[r]);
      EXPECT_EQ(p.sharded.shard(r).config().kv_heads, int(count[r]));
      EXPECT_EQ(p.sharded.tokens_of(r, p.sseqs[0], 0).count, 30u);
    }
  }
}

// Every shard's records are byte-identical to the single cache's for the same tokens and heads.
void expect_records_of_single_cache(const Pair& p, const std::string& what) {
  const int W = p.sharded.world();
  for (size_t b = 0; b < p.seqs.size(); ++b)
    for (int r = 0; r < W; ++r)
      for (int layer = 0; layer < p.single.config().layers; ++layer) {
        const auto tokens = p.sharded.tokens_of(r, p.sseqs[b], layer);
        const auto heads = p.sharded.heads_of(r);
        const KVCache& shard = p.sharded.shard(r);
        for (size_t h = 0; h < heads.count; ++h)
          for (bool values : {false, true}) {
            const size_t bytes = (values ? shard.value_layout() : shard.key_layout()).record_bytes;
            std::vector<uint8_t> mine(tokens.count * bytes), ref(tokens.count * bytes);
            shard.read_records(shard.sequences()[b], layer, int(h), values, 0, tokens.count,
                               mine.data());
            p.single.read_records(p.seqs[b], layer, int(heads.first + h), values, tokens.first,
                                  tokens.count, ref.data());
            EXPECT_EQ(mine, ref) << what << " shard " << r << " seq " << b << " layer " << layer
                                 << " head " << h;
          }
      }
}

TEST(Sharded, StoresTheCodesOfASingleCache) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (Placement placement : {Placement::sequence, Placement::heads}) {
    CacheConfig c = base_config(3, 64, 3);
    c.key.kind = CodecKind::prod;
    Pair p{ShardedCache(sharded(c, 3, placement)), KVCache(c), {}, {}};
    fill(p, rng, {{90, 7}, {5}});
    expect_records_of_single_cache(p, "placement " + std::to_string(int(placement)) + " seed " +
                                          std::to_string(seed));
  }
}

// A decode step of several sequences stores, on each shard, what one append a token stores:
// sequence placement sends each token to the shard whose share holds it (here tokens on three
// shards in one step, and a sequence whose first token is its step's), head placement every
// shard its heads of every row.
TEST(Sharded, AppendStepIsOneAppendAToken) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (Placement placement : {Placement::sequence, Placement::heads}) {
    const std::string what = "placement " + std::to_string(int(placement)) + " seed " +
                             std::to_string(seed);
    const CacheConfig c = base_config(3, 64, 4);
    Pair p{ShardedCache(sharded(c, 3, placement)), KVCache(c), {}, {}};
    fill(p, rng, {{40}, {10}, {25}, {}});  // shares of 16: tokens 40 on shard 2, 10 on 0, 25 on 1
    const size_t row = size_t(c.kv_heads) * size_t(c.head_dim);
    for (int step = 0; step < 8; ++step)
      for (int layer = 0; layer < c.layers; ++layer) {
        const std::vector<size_t> order = {3, 1, 0, 2};
        const auto k = gaussian(rng, order.size() * row), v = gaussian(rng, order.size() * row);
        std::vector<SequenceId> ids;
        for (size_t i = 0; i < order.size(); ++i) {
          ids.push_back(p.sseqs[order[i]]);
          p.single.append(p.seqs[order[i]], layer, &k[i * row], &v[i * row], 1);
        }
        const std::vector<const void*> ks(3, k.data()), vs(3, v.data());
        p.sharded.append_step(layer, ids, ks, vs);
      }
    expect_records_of_single_cache(p, what);
    // Placement: each token went where one append of it goes.
    ShardedCache one_by_one(sharded(c, 3, placement));
    const size_t prefill[] = {40, 10, 25, 0};
    for (size_t b = 0; b < 4; ++b) {
      const SequenceId id = one_by_one.add_sequence();
      for (int layer = 0; layer < c.layers; ++layer) {
        if (prefill[b] > 0) {
          const auto k = gaussian(rng, prefill[b] * row), v = gaussian(rng, prefill[b] * row);
          one_by_one.append(id, layer, std::vector<const void*>(3, k.data()),
                            std::vector<const void*>(3, v.data()), prefill[b]);
        }
        for (int step = 0; step < 8; ++step) {
          const auto k = gaussian(rng, row), v = gaussian(rng, row);
          one_by_one.append(id, layer, std::vector<const void*>(3, k.data()),
                            std::vector<const void*>(3, v.data()), 1);
        }
      }
      for (int r = 0; r < 3; ++r)
        for (int layer = 0; layer < c.layers; ++layer) {
          EXPECT_EQ(p.sharded.tokens_of(r, p.sseqs[b], layer).first,
                    one_by_one.tokens_of(r, id, layer).first) << what << " seq " << b;
          EXPECT_EQ(p.sharded.tokens_of(r, p.sseqs[b], layer).count,
                    one_by_one.tokens_of(r, id, layer).count) << what << " seq " << b;
        }
    }
    // Refused whole: a NaN in the last row (on whichever shard takes it).
    std::vector<size_t> lengths;
    for (SequenceId id : p.sseqs) lengths.push_back(p.sharded.length(id, 0));
    auto k = gaussian(rng, 4 * row), v = gaussian(rng, 4 * row);
    v[3 * row + 5] = std::numeric_limits<float>::quiet_NaN();
    const std::vector<const void*> ks(3, k.data()), vs(3, v.data());
    EXPECT_THROW(p.sharded.append_step(0, p.sseqs, ks, vs), Error) << what;
    for (size_t b = 0; b < p.sseqs.size(); ++b)
      EXPECT_EQ(p.sharded.length(p.sseqs[b], 0), lengths[b]) << what << b;
    const std::vector<SequenceId> twice = {p.sseqs[0], p.sseqs[0]};
    EXPECT_THROW(p.sharded.append_step(0, twice, ks, vs), Error) << what;
  }
}

struct Codecs {
  std::string name;
  CacheConfig config;
};

std::vector<Codecs> codec_cases() {
  std::vector<Codecs> out;
  out.push_back({"4-bit mse", base_config(4, 64, 4)});
  CacheConfig prod = base_config(4, 64, 3);
  prod.key.kind = CodecKind::prod;
  prod.value.bits = 2;
  out.push_back({"3-bit prod keys, 2-bit values", prod});
  CacheConfig frac = base_config(4, 64, 2.5);  // outliers given: the same codec on every shard
  for (int j = 0; j < 32; ++j) frac.key.outlier_channels.push_back(2 * j);
  for (int j = 0; j < 32; ++j) frac.value.outlier_channels.push_back(j);
  out.push_back({"2.5 bits, channels given", frac});
  CacheConfig center = base_config(4, 64, 4);
  center.key.center = center.value.center = true;
  center.key.offset.assign(64, 0.5f);
  center.value.offset.assign(64, -0.25f);
  out.push_back({"centering, offsets given", center});
  CacheConfig dense = base_config(2, 48, 4);  // dense rotation (48 is no power of two)
  out.push_back({"dense rotation, d = 48", dense});
  return out;
}

// Decode on 1..4 simulated ranks against the float64 reference of one cache with the same codes;
// sequences shorter than a share leave shards without tokens of them (empty states).
TEST(Sharded, DecodeMatchesTheReferenceOfOneCache) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (const Codecs& cc : codec_cases())
    for (Placement placement : {Placement::sequence, Placement::heads})
      for (int world : {1, 2, 3, 4}) {
        const CacheConfig& c = cc.config;
        if (placement == Placement::heads && world > c.kv_heads) continue;
        Pair p{ShardedCache(sharded(c, world, placement)), KVCache(c), {}, {}};
        fill(p, rng, {{200, 1}, {1}, {77, 40}, {16}});
        const int R = 2, q_heads = R * c.kv_heads, d = c.head_dim;
        const size_t B = p.seqs.size(), n = B * size_t(q_heads) * size_t(d);
        const std::vector<float> q = gaussian(rng, n);
        std::vector<float> ref(n);
        attend_reference(p.single, 1, p.seqs, std::vector<size_t>(B, 1), q.data(), q_heads,
                         ref.data());
        const std::string what = cc.name + (placement == Placement::heads ? ", heads" : ", seq") +
                                 ", world " + std::to_string(world) + ", seed " +
                                 std::to_string(seed);
        std::vector<std::vector<float>> qs(static_cast<size_t>(world)), outs(static_cast<size_t>(world));
        std::vector<const float*> qp;
        std::vector<float*> op;
        // Head placement: each shard takes and gives its query heads' rows only.
        auto rows_of = [&](const std::vector<float>& x, int r) {
          const auto heads = p.sharded.heads_of(r);
          return head_rows(x, B, size_t(q_heads), size_t(R) * heads.first,
                           size_t(R) * heads.count, size_t(d));
        };
        for (int r = 0; r < world; ++r) {
          qs[size_t(r)] = rows_of(q, r);
          outs[size_t(r)] = poisoned(qs[size_t(r)].size());
          qp.push_back(qs[size_t(r)].data());
          op.push_back(outs[size_t(r)].data());
        }
        p.sharded.attend_decode(1, p.sseqs, qp, q_heads, op);
        for (int r = 0; r < world; ++r)
          EXPECT_LT(relative_error(outs[size_t(r)], rows_of(ref, r)), kTolerance)
              << what << " shard " << r;
      }
}

// Calibrating codecs (fractional bits, centering, nothing given) with head placement: each head
// calibrates on its own tokens, as in one cache, so the codes and the decode match it too.
TEST(Sharded, HeadPlacementCalibratesAsOneCache) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  CacheConfig c = base_config(3, 64, 3.5);
  c.key.center = c.value.center = true;
  Pair p{ShardedCache(sharded(c, 3, Placement::heads)), KVCache(c), {}, {}};
  fill(p, rng, {{120, 1}, {33}});
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(p.sharded.shard(r).key_codec(1, 0).spec(), p.single.key_codec(1, r).spec())
        << "seed " << seed;
    EXPECT_EQ(p.sharded.shard(r).value_codec(1, 0).spec(), p.single.value_codec(1, r).spec())
        << "seed " << seed;
  }
  const int q_heads = 3;
  const std::vector<float> q = gaussian(rng, 2 * 3 * 64);
  std::vector<float> ref(q.size());
  attend_reference(p.single, 1, p.seqs, std::vector<size_t>(2, 1), q.data(), q_heads, ref.data());
  std::vector<std::vector<float>> qs(3), outs(3, poisoned(2 * 64));
  for (size_t r = 0; r < 3; ++r) qs[r] = head_rows(q, 2, 3, r, 1, 64);  // one query head a shard
  p.sharded.attend_decode(1, p.sseqs,
                          std::vector<const float*>{qs[0].data(), qs[1].data(), qs[2].data()},
                          q_heads,
                          std::vector<float*>{outs[0].data(), outs[1].data(), outs[2].data()});
  for (size_t r = 0; r < 3; ++r)
    EXPECT_LT(relative_error(outs[r], head_rows(ref, 2, 3, r, 1, 64)), kTolerance)
        << "shard " << r << " seed " << seed;
}

// merge_partial_states against a float64 merge of random states, empty ones among them.
TEST(Sharded, MergeOfPartialStatesMatchesFloat64) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int d = 40;
  const size_t rows = 7, world = 5, stride = 4 + d;
  std::vector<float> all = random_partial_states(rng, world, rows, size_t(d));
  std::vector<const float*> ptrs;
  for (size_t s = 0; s < world; ++s) ptrs.push_back(&all[s * rows * stride]);
  auto state = [&](size_t s, size_t r) { return &all[(s * rows + r) * stride]; };
  std::vector<float> out = poisoned(rows * size_t(d)), ref(rows * size_t(d));
  merge_partial_states(ptrs, rows, d, out.data());
  for (size_t r = 0; r < rows; ++r) {
    double M = -std::numeric_limits<double>::infinity(), L = 0;
    for (size_t s = 0; s < world; ++s)
      if (state(s, r)[1] > 0) M = std::max(M, double(state(s, r)[0]));
    std::vector<double> acc(size_t(d), 0.0);
    for (size_t s = 0; s < world; ++s) {
      const float* st = state(s, r);
      if (!(st[1] > 0)) continue;
      const double w = std::exp2(double(st[0]) - M);
      L += w * st[1];
      for (int j = 0; j < d; ++j) acc[size_t(j)] += w * st[4 + j];
    }
    for (int j = 0; j < d; ++j) ref[r * size_t(d) + size_t(j)] = float(acc[size_t(j)] / L);
  }
  EXPECT_LT(relative_error(out, ref), 1e-6) << "seed " << seed;
  // A row with only empty states has no answer.
  for (size_t s = 0; s < world; ++s) state(s, 3)[1] = 0.0f;
  std::vector<float> untouched = poisoned(rows * size_t(d));
  EXPECT_THROW(merge_partial_states(ptrs, rows, d, untouched.data()), Error);
  for (float x : untouched) EXPECT_TRUE(std::isnan(x));
}

TEST(Sharded, BadInputIsRefusedAndChangesNothing) {
  std::mt19937_64 rng(fresh_seed());
  const CacheConfig c = base_config(2, 64, 4);
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { ShardedCache(sharded(c, 0, Placement::sequence)); }).find("no devices"),
            std::string::npos);
  EXPECT_NE(message([&] { ShardedCache(sharded(c, 3, Placement::heads)); }).find("at least as many KV heads"),
            std::string::npos);
  EXPECT_NE(message([&] { ShardedCache(sharded(c, 2, Placement::sequence, 40)); }).find("multiple of page_tokens"),
            std::string::npos);
  EXPECT_NE(message([&] { ShardedCache(sharded(c, 5, Placement::sequence, size_t(1) << 62)); })
                .find("beyond any sequence"),
            std::string::npos);
  ShardedConfig dup = sharded(c, 2, Placement::sequence);
  dup.devices = {Device::cuda(0), Device::cuda(0)};
  EXPECT_NE(message([&] { ShardedCache{dup}; }).find("given twice"), std::string::npos);
  ShardedConfig mixed = sharded(c, 2, Placement::sequence);
  mixed.devices = {Device::cpu(), Device::cuda(0)};
  EXPECT_NE(message([&] { ShardedCache{mixed}; }).find("all CPU"), std::string::npos);

  CacheConfig small = c;
  small.max_pages = 4;
  Pair p{ShardedCache(sharded(small, 2, Placement::sequence, 32)), KVCache(small), {}, {}};
  fill(p, rng, {{10}});  // one page on shard 0: its part of the next appends needs a second
  const SequenceId id = p.sseqs[0];
  const size_t row = 2 * 64;
  std::vector<float> k = gaussian(rng, 200 * row), v = gaussian(rng, 200 * row);
  const std::vector<const void*> ks = {k.data(), k.data()}, vs = {v.data(), v.data()};
  const size_t free0 = p.sharded.shard(0).pages_free(), free1 = p.sharded.shard(1).pages_free();
  // Out of pages on the last shard: nothing stored on either.
  EXPECT_NE(message([&] { p.sharded.append(id, 0, ks, vs, 200); }).find("out of pages on shard 1"),
            std::string::npos);
  // A non-finite element in the last shard's part: the first shard drops its part (22 tokens,
  // into a second page) again, and that page.
  k[30 * row + 5] = std::numeric_limits<float>::infinity();
  EXPECT_NE(message([&] { p.sharded.append(id, 0, ks, vs, 40); }), "no error");
  for (int layer = 0; layer < 2; ++layer) EXPECT_EQ(p.sharded.length(id, layer), 10u);
  EXPECT_EQ(p.sharded.tokens_of(1, id, 0).count, 0u);
  EXPECT_EQ(p.sharded.shard(0).page_table(p.sharded.shard(0).sequences()[0]).size(), 1u);
  EXPECT_EQ(p.sharded.shard(0).pages_free(), free0);
  EXPECT_EQ(p.sharded.shard(1).pages_free(), free1);
  EXPECT_NE(message([&] { p.sharded.append(id, 0, std::vector<const void*>{ks[0]}, vs, 4); }).find("one of each per shard"),
            std::string::npos);
  EXPECT_NE(message([&] { p.sharded.append(99, 0, ks, vs, 4); }).find("does not exist"),
            std::string::npos);

  // Decode: a window needs positions a share does not have; pointers one per shard; the output
  // stays untouched.
  const std::vector<float> q = gaussian(rng, 2 * 64);
  std::vector<float> out = poisoned(2 * 64);
  const std::vector<const float*> qq = {q.data(), q.data()};
  const std::vector<float*> oo = {out.data(), out.data()};
  AttentionOptions window;
  window.window = 8;
  EXPECT_NE(message([&] { p.sharded.attend_decode(0, p.sseqs, qq, 2,
                                                  oo, window); })
                .find("window"),
            std::string::npos);
  EXPECT_NE(message([&] { p.sharded.attend_decode(0, p.sseqs, std::vector<const float*>{q.data()}, 2, std::vector<float*>{out.data()}); })
                .find("one of each per shard"),
            std::string::npos);
  EXPECT_NE(message([&] { p.sharded.attend_decode(0, p.sseqs, qq, 3,
                                                  oo); })
                .find("multiple of kv_heads"),
            std::string::npos);
  const SequenceId empty = p.sharded.add_sequence();
  EXPECT_NE(message([&] { p.sharded.attend_decode(0, std::vector<SequenceId>{empty}, qq, 2,
                                                  oo); })
                .find("holds no tokens"),
            std::string::npos);
  for (float x : out) EXPECT_TRUE(std::isnan(x));
  // After all that, decode still works and equals the reference.
  std::vector<float> ref(2 * 64);
  attend_reference(p.single, 0, p.seqs, std::vector<size_t>{1}, q.data(), 2, ref.data());
  p.sharded.attend_decode(0, p.sseqs, qq, 2, oo);
  EXPECT_LT(relative_error(out, ref), kTolerance);
}

}  // namespace
}  // namespace tqkv
