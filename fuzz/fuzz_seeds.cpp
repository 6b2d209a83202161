// Writes small valid .npy, .tqkv and ONNX files as starting corpora for the fuzz targets.
// Usage: fuzz_seeds NPY_DIR TQKV_DIR CACHE_DIR ONNX_DIR
#include <cstdio>
#include <string>
#include <vector>

#include "tqkv/cache.hpp"
#include "tqkv/codec.hpp"
#include "tqkv/file.hpp"
#include "tqkv/npy.hpp"
#include "tqkv/onnx.hpp"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: fuzz_seeds NPY_DIR TQKV_DIR CACHE_DIR ONNX_DIR\n");
    return 2;
  }
  const std::string npy_dir = argv[1], file_dir = argv[2], cache_dir = argv[3],
                    onnx_dir = argv[4];
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
  // ONNX: a MatMulInteger node over an int8 weight (raw data), its scale (float_data) and zero
  // point (int64_data), with graph inputs and outputs.
  {
    std::vector<uint8_t> weight(6);
    for (size_t i = 0; i < weight.size(); ++i) weight[i] = uint8_t(i * 37);
    tqkv::onnx::Model m;
    m.ir_version = 8;
    m.graph_name = "seed";
    m.nodes.push_back({"mm", "MatMulInteger", {"x", "w", "x_zp", "w_zp"}, {"y"}});
    tqkv::onnx::Tensor w, scale, zp;
    w.name = "w";
    w.dims = {2, 3};
    w.type = tqkv::onnx::DataType::int8;
    w.raw = weight;
    scale.name = "w_scale";
    scale.type = tqkv::onnx::DataType::float32;
    scale.floats = {0.125f};
    zp.name = "w_zp";
    zp.type = tqkv::onnx::DataType::int8;
    zp.ints = {-3};
    m.initializers = {w, scale, zp};
    m.inputs = {"x"};
    m.outputs = {"y"};
    const auto bytes = tqkv::onnx::serialize(m);
    tqkv::file::write_bytes(onnx_dir + "/seed.onnx", bytes);
  }
  return 0;
}
