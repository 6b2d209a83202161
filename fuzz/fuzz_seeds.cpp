// Writes small valid .npy and .tqkv files as starting corpora for the fuzz targets.
// Usage: fuzz_seeds NPY_DIR TQKV_DIR
#include <cstdio>
#include <string>
#include <vector>

#include "tqkv/codec.hpp"
#include "tqkv/file.hpp"
#include "tqkv/npy.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: fuzz_seeds NPY_DIR TQKV_DIR\n");
    return 2;
  }
  const std::string npy_dir = argv[1], file_dir = argv[2];
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
  return 0;
}
