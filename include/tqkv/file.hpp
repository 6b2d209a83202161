// The .tqkv file: a versioned, checksummed container, and the encoded-vectors file built on it.
//
// Container layout (little-endian), version 1:
//   offset  size  field
//        0     8  magic "TQKVFILE"
//        8     4  format version (1)
//       12     4  kind (1 = encoded vectors; later kinds: KV cache)
//       16     8  metadata bytes M
//       24     8  payload bytes P
//       32     8  XXH3-64 of the metadata
//       40     8  XXH3-64 of the payload
//       48     8  XXH3-64 of bytes 0..47 (the preamble itself)
//       56     M  metadata: UTF-8 JSON object
//     56+M     P  payload
// The file is exactly 56 + M + P bytes. Readers check every field, size and hash before using
// any of it, so a truncated or corrupted file gives a clear error, never garbage.
//
// Encoded-vectors metadata: {"codec": {dim, bits, kind, rotation, seed, norm_format,
// outlier_channels[, center: true, offset: [dim numbers]]}, "count": N, "record_bytes": R,
// "tqkv_version": "x.y.z"} (center and offset only for centering codecs); payload: N records
// of R bytes as laid out in codec.hpp. The codec spec carries the seed, so the file alone
// reproduces the rotation, codebooks and QJL matrix.
//
// KV-cache metadata: {"layers", "kv_heads", "head_dim", "page_tokens", "max_pages", "page_bytes",
// "key": spec, "value": spec (as configured), "key_codecs": [spec per (layer, head)],
// "value_codecs": [...] (with the outlier channels and offsets each chose), "sequences": [{"id", "lengths":
// [per layer], "pages"}], "next_id", "tqkv_version"}; payload: each sequence's pages in token
// order, each page its layers in order, page_bytes bytes per page (cache.hpp's page layout).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tqkv/codec.hpp"

namespace tqkv::file {

inline constexpr char kMagic[8] = {'T', 'Q', 'K', 'V', 'F', 'I', 'L', 'E'};
inline constexpr uint32_t kVersion = 1;
inline constexpr size_t kPreambleBytes = 56;

enum class Kind : uint32_t { encoded_vectors = 1, kv_cache = 2 };

struct Container {
  Kind kind = Kind::encoded_vectors;
  std::string metadata;          ///< JSON text
  std::vector<uint8_t> payload;
};

/// Container <-> bytes. `name` (a file name) prefixes every error message.
std::vector<uint8_t> serialize(const Container& c);
Container parse(std::span<const uint8_t> bytes, std::string_view name);

/// Whole-file I/O. write_bytes writes "<path>.tmp" then renames, so a failure never leaves a
/// partial file at `path`. Errors name the path.
std::vector<uint8_t> read_bytes(const std::filesystem::path& path);
void write_bytes(const std::filesystem::path& path, std::span<const uint8_t> bytes);

/// Codec spec <-> JSON text (strict: unknown, missing or ill-typed fields are errors).
std::string spec_to_json(const CodecSpec& spec);
CodecSpec spec_from_json(std::string_view json, std::string_view name);

/// A batch of encoded vectors with the codec that encoded them.
struct EncodedVectors {
  CodecSpec spec;
  size_t count = 0;
  size_t record_bytes = 0;
  std::vector<uint8_t> records;  ///< count * record_bytes
};

std::vector<uint8_t> serialize_encoded(const EncodedVectors& ev);
/// Parses and validates (kind, spec, record size against Codec(spec), payload size).
EncodedVectors parse_encoded(std::span<const uint8_t> bytes, std::string_view name);
void write_encoded(const std::filesystem::path& path, const EncodedVectors& ev);
EncodedVectors read_encoded(const std::filesystem::path& path);

/// A KV cache as stored in a file (KVCache::save / load build on this).
struct SavedCache {
  int layers = 0, kv_heads = 0, head_dim = 0, page_tokens = 0;
  uint64_t max_pages = 0, page_bytes = 0;
  CodecSpec key, value;
  std::vector<CodecSpec> key_specs, value_specs;  ///< [layer * kv_heads + head]
  struct Sequence {
    uint64_t id = 0;
    std::vector<uint64_t> lengths;  ///< per layer
    uint64_t pages = 0;
  };
  std::vector<Sequence> sequences;
  uint64_t next_id = 0;
  std::vector<uint8_t> payload;
};

std::vector<uint8_t> serialize_cache(const SavedCache& saved);
/// Parses and checks the structure (field types, counts, payload size = pages * page_bytes);
/// KVCache::parse checks the configuration itself.
SavedCache parse_cache(std::span<const uint8_t> bytes, std::string_view name);

}  // namespace tqkv::file
