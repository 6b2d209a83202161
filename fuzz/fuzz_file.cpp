// libFuzzer target for the .tqkv parser. Malformed input must end in tqkv::Error; anything else
// (a crash, a sanitizer report, another exception) is a bug. Accepted input must decode and
// survive a serialize/parse round trip unchanged.
//
// Two modes, picked by the first byte:
//   'J'  the rest is metadata JSON; it is wrapped in a container with correct hashes and an
//        empty payload, so the JSON and codec-spec validation is fuzzed past the checksums;
//   else the input is a whole file (mutations rarely get past the hashes; that is expected).
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "tqkv/codec.hpp"
#include "tqkv/error.hpp"
#include "tqkv/file.hpp"

namespace {

// Building a Codec costs O(dim^3) for a dense rotation (about 0.16 s at dim 256 and 7 s at 1024
// under ASan), so larger specs are skipped to keep the fuzzer fast. The brief's bound was 4096;
// dense QR at 4096 takes minutes.
constexpr uint64_t kMaxFuzzDim = 256;
constexpr size_t kMaxDecodeFloats = size_t(1) << 20;

// True if the metadata might give the codec a dim above kMaxFuzzDim. The check runs before
// parse_encoded (which builds the Codec) and must not miss any: a key that decodes to "dim" is
// written literally unless it uses \u escapes, so text with "\u" is conservatively skipped; a
// value spec_from_json accepts for "dim" is a plain run of digits.
bool may_be_large(std::string_view meta) {
  if (meta.find("\\u") != std::string_view::npos) return true;
  const auto ws = [&](size_t i) {
    while (i < meta.size() && (meta[i] == ' ' || meta[i] == '\t' || meta[i] == '\n' ||
                               meta[i] == '\r'))
      ++i;
    return i;
  };
  for (size_t at = meta.find("\"dim\""); at != std::string_view::npos;
       at = meta.find("\"dim\"", at + 1)) {
    size_t i = ws(at + 5);
    if (i >= meta.size() || meta[i] != ':') continue;
    i = ws(i + 1);
    uint64_t v = 0;
    for (; i < meta.size() && meta[i] >= '0' && meta[i] <= '9'; ++i) {
      v = v * 10 + uint64_t(meta[i] - '0');
      if (v > kMaxFuzzDim) return true;
    }
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> wrapped;
  std::span<const uint8_t> input(data, size);
  if (size > 0 && data[0] == 'J') {
    tqkv::file::Container c;
    c.metadata.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
    wrapped = tqkv::file::serialize(c);
    input = wrapped;
  }

  tqkv::file::EncodedVectors ev;
  try {
    const tqkv::file::Container c = tqkv::file::parse(input, "fuzz.tqkv");
    if (may_be_large(c.metadata)) return 0;
    ev = tqkv::file::parse_encoded(input, "fuzz.tqkv");
  } catch (const tqkv::Error&) {
    return 0;
  }

  // Accepted: the records must decode (no error, no sanitizer report) ...
  if (ev.spec.dim < 2 || uint64_t(ev.spec.dim) > kMaxFuzzDim) __builtin_trap();
  const tqkv::Codec codec(ev.spec);
  if (!codec.ready() || codec.record_bytes() != ev.record_bytes ||
      ev.records.size() != ev.count * ev.record_bytes)
    __builtin_trap();
  if (ev.count <= kMaxDecodeFloats / size_t(ev.spec.dim)) {
    std::vector<float> out(ev.count * size_t(ev.spec.dim));
    codec.decode(ev.records.data(), ev.count, out.data());
  }

  // ... and survive a round trip unchanged.
  const std::vector<uint8_t> bytes = tqkv::file::serialize_encoded(ev);
  const tqkv::file::EncodedVectors back = tqkv::file::parse_encoded(bytes, "roundtrip.tqkv");
  if (!(back.spec == ev.spec) || back.count != ev.count || back.record_bytes != ev.record_bytes ||
      back.records != ev.records)
    __builtin_trap();
  return 0;
}
