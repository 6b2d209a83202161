// Writes small valid .npy and .tqkv files as starting corpora for the fuzz targets.
// Usage: fuzz_seeds NPY_DIR TQKV_DIR CACHE_DIR
#include <cstdio>
#include <string>
#include <vector>

#include "tqkv/cache.hpp"
#include "tqkv/codec.hpp"
#include "tqkv/file.hpp"
#include "tqkv/npy.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: fuzz_seeds NPY_DIR TQKV_DIR CACHE_DIR\n");
    return 2;
  }
  const std::string npy_dir = argv[1], file_dir = argv[2], cache_dir = argv[3];
  std::vector<float> x(3 * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 7) - 3.0f;
  const size_t shape2[2] = {3, 16}, shape1[1] = {48}, shape3[3] = {1, 3, 16};
  tqkv::npy::write(npy_dir + "/a.npy", x, shape2);
  tqkv::npy::write(npy_dir + "/b.npy", x, shape1, tqkv::npy::DType::f16);
  tqkv::npy::write(npy_dir + "/c.npy", x, shape3);
  int k = 0;
  for (double bits : {1.0, 3.0, 2.5}) {
    for (auto kind : {tqkv::CodecKind::mse, tqkv::CodecKind::prod}) {
      tqkv::CodecSpec spec;
      spec.dim = 16;
      spec.bits = bits;
      spec.kind = kind;
      spec.seed = 7;
      tqkv::Codec codec(spec);
      tqkv::file::EncodedVectors ev;
      ev.count = 3;
      ev.record_bytes = codec.record_bytes();
      ev.records.resize(ev.count * ev.record_bytes);
      codec.encode(x.data(), ev.count, ev.records.data());
      ev.spec = codec.spec();
      tqkv::file::write_encoded(file_dir + "/seed" + std::to_string(k++) + ".tqkv", ev);
    }
  }
  // KV caches: a small one per codec flavour, two sequences of different lengths.
  for (double bits : {4.0, 2.5}) {
    for (auto kind : {tqkv::CodecKind::mse, tqkv::CodecKind::prod}) {
      tqkv::CacheConfig config;
      config.layers = 2;
      config.kv_heads = 1;
      config.head_dim = 16;
      config.key.bits = bits;
      config.key.kind = kind;
      config.value.bits = bits;
      config.page_tokens = 8;
      config.max_pages = 8;
      tqkv::KVCache cache(config);
      const tqkv::SequenceId a = cache.add_sequence(), b = cache.add_sequence();
      cache.append(a, 0, x.data(), x.data() + 16, 2);
      cache.append(b, 1, x.data(), x.data(), 3);
      cache.save(cache_dir + "/seed" + std::to_string(k) + ".tqkv");
      // The 'J' mode of fuzz_cache: the metadata alone, so JSON mutations reach the checks
      // behind the hashes. Its payload is empty, so an empty cache is the valid start.
      tqkv::KVCache empty(config);
      const auto meta = tqkv::file::parse(empty.serialize(), "seed").metadata;
      std::FILE* f = std::fopen((cache_dir + "/json" + std::to_string(k++)).c_str(), "wb");
      if (!f) return 1;
      std::fputc('J', f);
      std::fwrite(meta.data(), 1, meta.size(), f);
      std::fclose(f);
    }
  }
  return 0;
}
