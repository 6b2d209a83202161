// libFuzzer target for the ONNX reader. Malformed input must end in tqkv::Error; anything else
// (a crash, a sanitizer report, another exception) is a bug. An accepted model must survive a
// serialize/parse round trip unchanged, and its tensors must convert or refuse cleanly.
#include <cstdint>
#include <cstring>
#include <vector>

#include "tqkv/error.hpp"
#include "tqkv/onnx.hpp"

namespace {

bool same(const tqkv::onnx::Tensor& a, const tqkv::onnx::Tensor& b) {
  return a.name == b.name && a.dims == b.dims && a.type == b.type &&
         a.raw.size() == b.raw.size() &&
         (a.raw.empty() || std::memcmp(a.raw.data(), b.raw.data(), a.raw.size()) == 0) &&
         a.floats.size() == b.floats.size() &&
         (a.floats.empty() ||
          std::memcmp(a.floats.data(), b.floats.data(), a.floats.size() * 4) == 0) &&
         a.ints == b.ints;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tqkv::onnx::Model a;
  try {
    a = tqkv::onnx::parse(std::vector<uint8_t>(data, data + size), "fuzz.onnx");
  } catch (const tqkv::Error&) {
    return 0;
  }
  const tqkv::onnx::Model b = tqkv::onnx::parse(tqkv::onnx::serialize(a), "roundtrip.onnx");
  if (a.ir_version != b.ir_version || a.graph_name != b.graph_name || a.inputs != b.inputs ||
      a.outputs != b.outputs || a.nodes.size() != b.nodes.size() ||
      a.initializers.size() != b.initializers.size())
    __builtin_trap();
  for (size_t i = 0; i < a.nodes.size(); ++i) {
    const auto &x = a.nodes[i], &y = b.nodes[i];
    if (x.name != y.name || x.op_type != y.op_type || x.inputs != y.inputs ||
        x.outputs != y.outputs)
      __builtin_trap();
  }
  for (size_t i = 0; i < a.initializers.size(); ++i) {
    if (!same(a.initializers[i], b.initializers[i])) __builtin_trap();
    if (a.initializers[i].elements() > (size_t(1) << 20)) continue;  // keep iterations fast
    try {
      (void)a.initializers[i].to_floats();
    } catch (const tqkv::Error&) {
    }
  }
  return 0;
}
