// The paged KV cache: chunking-independent codes, page accounting, rollback, files, bad input.
#include "tqkv/cache.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tqkv/attention.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "test_support.hpp"

namespace tqkv {
namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

std::vector<float> gaussian(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<float> g;
  std::vector<float> out(n);
  for (auto& x : out) x = g(rng);
  return out;
}

CacheConfig config(std::mt19937_64& rng, double key_bits = 4, double value_bits = 4,
                   CodecKind kind = CodecKind::mse) {
  CacheConfig c;
  c.layers = 3;
  c.kv_heads = 2;
  c.head_dim = 64;
  c.key = {.dim = 64, .bits = key_bits, .kind = kind, .seed = rng()};
  c.value = {.dim = 64, .bits = value_bits, .seed = rng()};
  c.page_tokens = 16;
  c.max_pages = 64;
  return c;
}

// All records of (seq, layer), keys then values, every head.
std::vector<uint8_t> all_records(const KVCache& cache, SequenceId seq, int layer) {
  std::vector<uint8_t> out;
  const size_t T = cache.length(seq, layer);
  for (int h = 0; h < cache.config().kv_heads; ++h)
    for (bool values : {false, true}) {
      const size_t rb = (values ? cache.value_layout() : cache.key_layout()).record_bytes;
      std::vector<uint8_t> r(T * rb);
      cache.read_records(seq, layer, h, values, 0, T, r.data());
      out.insert(out.end(), r.begin(), r.end());
    }
  return out;
}

void append_chunks(KVCache& cache, SequenceId seq, int layer, const std::vector<float>& k,
                   const std::vector<float>& v, const std::vector<size_t>& chunks) {
  const size_t row = size_t(cache.config().kv_heads) * size_t(cache.config().head_dim);
  size_t t = 0;
  for (size_t n : chunks) {
    cache.append(seq, layer, &k[t * row], &v[t * row], n);
    t += n;
  }
}

TEST(Cache, CodesDoNotDependOnChunking) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (double bits : {4.0, 3.5, 2.5}) {
    for (CodecKind kind : {CodecKind::mse, CodecKind::prod}) {
      // Fractional codecs are given their channels so that every chunking uses the same ones.
      CacheConfig c = config(rng, bits, bits, kind);
      if (bits != 4.0) {
        c.key.outlier_channels.clear();
        for (int j = 0; j < 32; ++j) c.key.outlier_channels.push_back(2 * j + 1);
        c.value.outlier_channels = c.key.outlier_channels;
      }
      const size_t T = 17 + 200;
      const auto k = gaussian(rng, T * 2 * 64), v = gaussian(rng, T * 2 * 64);
      KVCache a(c), b(c), r(c);
      const SequenceId sa = a.add_sequence(), sb = b.add_sequence(), sr = r.add_sequence();
      append_chunks(a, sa, 1, k, v, {16, 1});
      append_chunks(b, sb, 1, k, v, {17});
      EXPECT_EQ(all_records(a, sa, 1), all_records(b, sb, 1));
      // Random chunkings of all T tokens.
      std::vector<size_t> chunks;
      for (size_t t = 0; t < T;) {
        const size_t n = std::min(T - t, size_t(1 + rng() % 40));
        chunks.push_back(n);
        t += n;
      }
      append_chunks(r, sr, 1, k, v, chunks);
      KVCache whole(c);
      const SequenceId sw = whole.add_sequence();
      append_chunks(whole, sw, 1, k, v, {T});
      EXPECT_EQ(all_records(r, sr, 1), all_records(whole, sw, 1));
      // And the stored records are exactly what the codec produces.
      std::vector<float> head0(T * 64);
      for (size_t t = 0; t < T; ++t) std::memcpy(&head0[t * 64], &k[t * 128], 64 * 4);
      std::vector<uint8_t> direct(T * whole.key_codec(1, 0).record_bytes());
      whole.key_codec(1, 0).encode(head0.data(), T, direct.data());
      const auto stored = all_records(whole, sw, 1);
      EXPECT_TRUE(std::equal(direct.begin(), direct.end(), stored.begin()));
    }
  }
}

// A decode step of several sequences gives each the codes one append of its token gives; bad
// steps are refused whole, naming the first bad vector in (keys, values; head; sequence) order.
TEST(Cache, AppendStepIsOneAppendASequence) {
  using testing::error_of;
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (double bits : {4.0, 3.5}) {
    const CacheConfig c = config(rng, bits, bits);
    KVCache a(c), b(c);
    std::vector<SequenceId> sa, sb;
    for (int i = 0; i < 5; ++i) {  // prefills of different lengths, 15 or 16 tokens: the steps
      sa.push_back(a.add_sequence());  // cross page boundaries at different times
      sb.push_back(b.add_sequence());
      const size_t T = 14 + size_t(i % 3);
      const auto k = gaussian(rng, T * 128), v = gaussian(rng, T * 128);
      a.append(sa.back(), 2, k.data(), v.data(), T);
      b.append(sb.back(), 2, k.data(), v.data(), T);
    }
    for (int step = 0; step < 3; ++step) {
      const std::vector<size_t> order = {3, 0, 4, 1};  // a step of 4 of them, out of order
      const auto k = gaussian(rng, order.size() * 128), v = gaussian(rng, order.size() * 128);
      std::vector<SequenceId> ids;
      for (size_t i = 0; i < order.size(); ++i) {
        ids.push_back(sa[order[i]]);
        b.append(sb[order[i]], 2, &k[i * 128], &v[i * 128], 1);
      }
      a.append_step(2, ids, k.data(), v.data());
    }
    for (int i = 0; i < 5; ++i) {
      EXPECT_EQ(a.length(sa[size_t(i)], 2), b.length(sb[size_t(i)], 2)) << i;
      EXPECT_EQ(all_records(a, sa[size_t(i)], 2), all_records(b, sb[size_t(i)], 2)) << i;
    }
    EXPECT_EQ(a.pages_free(), b.pages_free());
    // Refused whole: a repeated or unknown sequence, a NaN (the values' NaN of sequence 0 comes
    // after the keys' infinity of sequence 2, head 1), a layer whose codecs are not ready.
    const size_t free_before = a.pages_free();
    std::vector<size_t> lengths;
    for (SequenceId id : sa) lengths.push_back(a.length(id, 2));
    auto k = gaussian(rng, 3 * 128), v = gaussian(rng, 3 * 128);
    const std::vector<SequenceId> twice = {sa[0], sa[1], sa[0]}, unknown = {sa[0], 999, sa[1]};
    EXPECT_NE(error_of([&] { a.append_step(2, twice, k.data(), v.data()); }).find("twice"),
              std::string::npos);
    EXPECT_THROW(a.append_step(2, unknown, k.data(), v.data()), Error);
    const std::vector<SequenceId> three = {sa[0], sa[1], sa[2]};
    v[0 * 128 + 5] = std::numeric_limits<float>::quiet_NaN();
    k[2 * 128 + 64 + 9] = std::numeric_limits<float>::infinity();
    const std::string m = error_of([&] { a.append_step(2, three, k.data(), v.data()); });
    EXPECT_NE(m.find("keys of KV head 1"), std::string::npos) << m;
    EXPECT_NE(m.find("sequence " + std::to_string(sa[2])), std::string::npos) << m;
    EXPECT_NE(m.find("token " + std::to_string(lengths[2])), std::string::npos) << m;
    k[2 * 128 + 64 + 9] = 0.5f;
    const std::string m2 = error_of([&] { a.append_step(2, three, k.data(), v.data()); });
    EXPECT_NE(m2.find("values of KV head 0"), std::string::npos) << m2;
    // A CPU cache checks a deferred step at once: the same refusal, from the call itself.
    EXPECT_EQ(error_of([&] {
                a.append_step(2, three, k.data(), v.data(), ScalarType::f32, StepCheck::deferred);
              }),
              m2);
    EXPECT_NO_THROW(a.check());
    EXPECT_NE(error_of([&] {
                a.append_step(2, three, k.data(), v.data(), ScalarType::f32, StepCheck(7));
              }).find("unknown StepCheck 7"),
              std::string::npos);
    EXPECT_NE(m2.find("sequence " + std::to_string(sa[0])), std::string::npos) << m2;
    for (size_t i = 0; i < sa.size(); ++i) EXPECT_EQ(a.length(sa[i], 2), lengths[i]) << i;
    EXPECT_EQ(a.pages_free(), free_before);
    v[0 * 128 + 5] = 0.5f;
    if (bits == 3.5) {
      const std::string m3 = error_of([&] { a.append_step(0, three, k.data(), v.data()); });
      EXPECT_NE(m3.find("prefill"), std::string::npos) << m3;
    } else {  // integer bits: ready from the start
      a.append_step(0, three, k.data(), v.data());
      EXPECT_EQ(a.length(sa[2], 0), 1u);
    }
  }
}

TEST(Cache, HalfAndBfloat16Input) {
  std::mt19937_64 rng(fresh_seed());
  CacheConfig c = config(rng);
  const size_t T = 40;
  const auto k = gaussian(rng, T * 128), v = gaussian(rng, T * 128);
  std::vector<uint16_t> kh(k.size()), vh(v.size());
  for (auto type : {ScalarType::f16, ScalarType::bf16}) {
    std::vector<float> kr(k.size()), vr(v.size());
    for (size_t i = 0; i < k.size(); ++i) {
      kh[i] = type == ScalarType::f16 ? float_to_half(k[i]) : float_to_bf16(k[i]);
      vh[i] = type == ScalarType::f16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
      kr[i] = type == ScalarType::f16 ? half_to_float(kh[i]) : bf16_to_float(kh[i]);
      vr[i] = type == ScalarType::f16 ? half_to_float(vh[i]) : bf16_to_float(vh[i]);
    }
    KVCache a(c), b(c);
    const SequenceId sa = a.add_sequence(), sb = b.add_sequence();
    a.append(sa, 0, kh.data(), vh.data(), T, type);
    b.append(sb, 0, kr.data(), vr.data(), T);
    EXPECT_EQ(all_records(a, sa, 0), all_records(b, sb, 0));
  }
}

TEST(Cache, MemoryAccountingIsExact) {
  std::mt19937_64 rng(fresh_seed());
  CacheConfig c = config(rng, 4, 3);
  KVCache cache(c);
  // 4-bit keys: 32 B codes + 2 B norm; 3-bit values: 24 B + 2 B; two heads.
  EXPECT_EQ(cache.bytes_per_token_per_layer(), size_t(2 * (34 + 26)));
  EXPECT_EQ(cache.bytes_per_token(), 3 * cache.bytes_per_token_per_layer());
  EXPECT_EQ(cache.fp16_bytes_per_token(), size_t(3 * 2 * 64 * 2 * 2));
  EXPECT_EQ(cache.pages_total(), 64u);
  EXPECT_EQ(cache.pages_free(), 64u);
  const SequenceId s = cache.add_sequence();
  const auto k = gaussian(rng, 40 * 128), v = gaussian(rng, 40 * 128);
  cache.append(s, 0, k.data(), v.data(), 40);
  cache.append(s, 1, k.data(), v.data(), 17);
  EXPECT_EQ(cache.pages_free(), 64u - 3);  // ceil(40 / 16)
  EXPECT_EQ(cache.stored_bytes(), (40 + 17) * cache.bytes_per_token_per_layer());
  EXPECT_EQ(cache.used_page_bytes(), 3 * cache.page_bytes());
  EXPECT_EQ(cache.page_bytes() % 64, 0u);
}

TEST(Cache, TruncateAndFreeReturnPages) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  CacheConfig c = config(rng);
  KVCache cache(c), fresh(c);
  const auto k = gaussian(rng, 100 * 128), v = gaussian(rng, 100 * 128);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  for (int l = 0; l < 3; ++l) {
    cache.append(a, l, k.data(), v.data(), 100);
    cache.append(b, l, k.data(), v.data(), 20);
  }
  EXPECT_EQ(cache.pages_free(), 64u - 7 - 2);
  cache.truncate(a, 70);  // 30 left: 2 pages
  EXPECT_EQ(cache.length(a, 2), 30u);
  EXPECT_EQ(cache.pages_free(), 64u - 2 - 2);
  // Regrowing after a rollback gives the codes a fresh append would.
  for (int l = 0; l < 3; ++l) cache.append(a, l, k.data() + 30 * 128, v.data() + 30 * 128, 5);
  const SequenceId f = fresh.add_sequence();
  fresh.append(f, 2, k.data(), v.data(), 35);
  EXPECT_EQ(all_records(cache, a, 2), all_records(fresh, f, 2));
  cache.free_sequence(b);
  EXPECT_FALSE(cache.contains(b));
  EXPECT_EQ(cache.pages_free(), 64u - 3);
  EXPECT_THROW(cache.truncate(a, 36), Error);
  EXPECT_EQ(cache.length(a, 0), 35u);
}

// Every failure leaves the cache exactly as it was.
TEST(Cache, BadInputChangesNothing) {
  std::mt19937_64 rng(fresh_seed());
  CacheConfig c = config(rng, 3.5, 2.5);  // fractional, channels chosen on first append
  c.max_pages = 4;
  KVCache cache(c);
  const SequenceId s = cache.add_sequence();
  auto k = gaussian(rng, 64 * 128), v = gaussian(rng, 64 * 128);
  const auto expect_error = [&](auto&& fn, const std::string& needle) {
    const size_t free = cache.pages_free(), len = cache.length(s, 0);
    const bool ready = cache.key_codec(0, 1).ready();
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(cache.pages_free(), free);
    EXPECT_EQ(cache.length(s, 0), len);
    EXPECT_EQ(cache.key_codec(0, 1).ready(), ready);
  };
  expect_error([&] { cache.append(s + 9, 0, k.data(), v.data(), 1); }, "does not exist");
  expect_error([&] { cache.append(s, 3, k.data(), v.data(), 1); }, "layer 3");
  expect_error([&] { cache.append(s, 0, k.data(), v.data(), 65); }, "out of pages");
  v[64 * 5 + 7] = std::numeric_limits<float>::infinity();  // token 2, head 1
  expect_error([&] { cache.append(s, 0, k.data(), v.data(), 10); }, "non-finite");
  v[64 * 5 + 7] = 0;
  k[64 * 3] = 1e6f;  // norm above the f16 norm format
  expect_error([&] { cache.append(s, 0, k.data(), v.data(), 10); }, "norm");
  k[64 * 3] = 0;
  cache.append(s, 0, k.data(), v.data(), 10);
  EXPECT_TRUE(cache.key_codec(0, 1).ready());
  EXPECT_FALSE(cache.key_codec(1, 1).ready());
  // Heads chose their own outlier channels.
  EXPECT_EQ(cache.key_codec(0, 0).spec().outlier_channels.size(), 32u);
  expect_error([&] { cache.truncate(s + 9, 1); }, "does not exist");
  expect_error([&] { cache.free_sequence(s + 9); }, "does not exist");

  auto bad_config = [&](auto&& edit, const std::string& needle) {
    CacheConfig b = config(rng);
    edit(b);
    try {
      KVCache x(b);
      ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  bad_config([](CacheConfig& b) { b.head_dim = 60; }, "head_dim");
  bad_config([](CacheConfig& b) { b.key.bits = 9; }, "key codec");
  bad_config([](CacheConfig& b) { b.value.bits = 0.5; }, "value codec");
  bad_config([](CacheConfig& b) { b.page_tokens = 12; }, "page_tokens");
  bad_config([](CacheConfig& b) { b.layers = 0; }, "layers");
  bad_config([](CacheConfig& b) { b.key.rotation = RotationChoice::hadamard; b.head_dim = 96; },
             "Hadamard");
}

TEST(CacheFile, SaveLoadGivesBitIdenticalAttention) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (bool center : {false, true}) {
  SCOPED_TRACE(center ? "centering codecs" : "plain codecs");
  CacheConfig c = config(rng, 3.5, 4, CodecKind::prod);
  c.key.center = c.value.center = center;  // each (layer, head) chooses its offset
  KVCache cache(c);
  const auto k = gaussian(rng, 90 * 128), v = gaussian(rng, 90 * 128);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  cache.append(a, 2, k.data(), v.data(), 90);
  cache.append(b, 2, k.data(), v.data(), 33);
  cache.append(b, 0, k.data(), v.data(), 3);
  cache.free_sequence(cache.add_sequence());  // ids need not be contiguous
  const auto path = std::filesystem::temp_directory_path() /
                    ("tqkv_cache_" + std::to_string(seed) + ".tqkv");
  cache.save(path);
  const KVCache loaded = KVCache::load(path);
  std::filesystem::remove(path);
  EXPECT_EQ(loaded.sequences(), cache.sequences());
  EXPECT_EQ(loaded.length(b, 0), 3u);
  EXPECT_EQ(loaded.key_codec(2, 1).spec(), cache.key_codec(2, 1).spec());
  const std::vector<SequenceId> seqs = {a, b};
  const auto q = gaussian(rng, 2 * 4 * 64);
  std::vector<float> o1(q.size()), o2(q.size());
  attend_decode(cache, 2, seqs, q.data(), 4, o1.data());
  attend_decode(loaded, 2, seqs, q.data(), 4, o2.data());
  EXPECT_EQ(0, std::memcmp(o1.data(), o2.data(), o1.size() * 4));
  EXPECT_EQ(loaded.serialize(), cache.serialize());
  if (center) {
    EXPECT_EQ(loaded.value_codec(2, 0).offset().size(), 64u);
    EXPECT_NE(loaded.key_codec(2, 0).offset(), loaded.key_codec(2, 1).offset());
  }
  }
}

TEST(CacheFile, TruncatedOrCorruptedFilesAreRejected) {
  std::mt19937_64 rng(fresh_seed());
  CacheConfig c = config(rng);
  KVCache cache(c);
  const auto k = gaussian(rng, 20 * 128), v = gaussian(rng, 20 * 128);
  cache.append(cache.add_sequence(), 0, k.data(), v.data(), 20);
  const auto bytes = cache.serialize();
  for (size_t n = 0; n < bytes.size(); n += 1 + n / 7) {
    const std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(n));
    EXPECT_THROW(KVCache::parse(cut, "cut.tqkv"), Error) << n;
  }
  for (size_t i = 0; i < bytes.size(); i += 1 + i / 5) {
    auto bad = bytes;
    bad[i] ^= 0x10;
    try {
      KVCache::parse(bad, "bad.tqkv");
      ADD_FAILURE() << "flipping byte " << i << " was not detected";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("bad.tqkv"), std::string::npos) << e.what();
    }
  }
  // A pool too small for what the file holds.
  EXPECT_THROW(KVCache::parse(bytes, "small.tqkv", 1), Error);
  EXPECT_NO_THROW(KVCache::parse(bytes, "ok.tqkv", 2));
}

}  // namespace
}  // namespace tqkv
