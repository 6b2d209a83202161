// libFuzzer target for KV-cache files. Malformed input must end in tqkv::Error; anything else is
// a bug. An accepted cache must answer attention on every stored sequence and survive a
// save/load round trip byte for byte.
//
// As in fuzz_file: a first byte 'J' means the rest is metadata JSON, wrapped with correct hashes
// and an empty payload; otherwise the input is a whole file.
#include <cstdint>
#include <span>
#include <vector>

#include "tqkv/attention.hpp"
#include "tqkv/cache.hpp"
#include "tqkv/error.hpp"
#include "tqkv/file.hpp"

namespace {
// Codec construction costs O(dim^3) for dense rotations, once per (layer, head) with fractional
// bits; pools are allocated up front. Larger configurations are skipped to keep the fuzzer fast.
constexpr int kMaxDim = 128;
constexpr int kMaxPairs = 16;
constexpr uint64_t kMaxPages = 4096;
constexpr uint64_t kMaxTokens = 4096;
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> wrapped;
  std::span<const uint8_t> input(data, size);
  if (size > 0 && data[0] == 'J') {
    tqkv::file::Container c;
    c.kind = tqkv::file::Kind::kv_cache;
    c.metadata.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
    wrapped = tqkv::file::serialize(c);
    input = wrapped;
  }
  try {
    const tqkv::file::SavedCache saved = tqkv::file::parse_cache(input, "fuzz.tqkv");
    if (saved.head_dim > kMaxDim || saved.layers * saved.kv_heads > kMaxPairs ||
        saved.max_pages > kMaxPages)
      return 0;
    for (const auto& s : saved.sequences)
      for (uint64_t n : s.lengths)
        if (n > kMaxTokens) return 0;
  } catch (const tqkv::Error&) {
    return 0;
  }
  std::vector<uint8_t> bytes;
  try {
    const tqkv::KVCache cache = tqkv::KVCache::parse(input, "fuzz.tqkv");
    bytes = cache.serialize();
    const tqkv::KVCache back = tqkv::KVCache::parse(bytes, "roundtrip.tqkv");
    if (back.serialize() != bytes) __builtin_trap();
    // Attention over whatever the file stores: codes are arbitrary bytes, which must still give
    // finite or at least well-defined results, never a crash.
    const int heads = cache.config().kv_heads;
    std::vector<float> q(size_t(heads) * size_t(cache.config().head_dim), 0.5f), out(q.size());
    for (tqkv::SequenceId id : cache.sequences())
      for (int l = 0; l < cache.config().layers; ++l)
        if (cache.length(id, l) > 0) {
          const tqkv::SequenceId one[1] = {id};
          try {
            tqkv::attend_decode(cache, l, one, q.data(), heads, out.data());
          } catch (const tqkv::Error&) {
            // e.g. a norm stored as NaN makes no valid attention; an error is fine.
          }
        }
  } catch (const tqkv::Error&) {
    if (!bytes.empty()) __builtin_trap();  // a cache we wrote must load again
  }
  return 0;
}
