// libFuzzer target for the .npy parser. Malformed input must end in tqkv::Error; anything else
// (a crash, a sanitizer report, another exception) is a bug. Accepted input must survive a
// serialize/parse round trip bit for bit.
#include <cstdint>
#include <cstring>

#include "tqkv/error.hpp"
#include "tqkv/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tqkv::npy::Array a;
  try {
    a = tqkv::npy::parse({data, size}, "fuzz.npy");
  } catch (const tqkv::Error&) {
    return 0;
  }
  // Stored as f32, the widened values must come back unchanged (NaN payloads included).
  const std::vector<uint8_t> bytes = tqkv::npy::serialize(a.data, a.shape, tqkv::npy::DType::f32);
  const tqkv::npy::Array b = tqkv::npy::parse(bytes, "roundtrip.npy");
  if (b.stored != tqkv::npy::DType::f32 || b.shape != a.shape || b.data.size() != a.data.size())
    __builtin_trap();
  if (!a.data.empty() &&
      std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) != 0)
    __builtin_trap();
  return 0;
}
