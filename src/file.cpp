// The .tqkv container and the encoded-vectors file. The parser treats its input as hostile (it is
// fuzzed): sizes are checked against the bytes present with overflow-safe arithmetic, and every
// hash is verified before any metadata or payload byte is interpreted or copied.
#include "tqkv/file.hpp"

#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <system_error>

#include "tqkv/error.hpp"

namespace tqkv::file {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

constexpr const char* kTqkvVersion = "0.1.0";  // written into every encoded-vectors file
constexpr size_t kSizeMax = std::numeric_limits<size_t>::max();
constexpr int kMaxCodecDim = 65536;  // Codec's own limit; checked early so nothing huge is built
constexpr int kMaxJsonDepth = 32;    // metadata is two levels deep; bound hostile nesting

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw Error(detail::concat(parts...));
}

std::string errno_text(int e) { return e ? std::generic_category().message(e) : "unknown error"; }

uint64_t hash(const uint8_t* p, size_t n) { return XXH3_64bits(p, n); }

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

bool known_kind(Kind k) { return k == Kind::encoded_vectors || k == Kind::kv_cache; }

// Offset of the first byte that is not part of well-formed UTF-8 (no overlong forms, no
// surrogates, nothing above U+10FFFF), or npos if the whole text is valid.
size_t invalid_utf8_at(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned c = b(i);
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c < 0x80) {
      len = 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // UTF-16 surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
      return i;
    }
    if (len > s.size() - i) return i;
    if (len > 1 && (b(i + 1) < lo || b(i + 1) > hi)) return i;
    for (size_t k = 2; k < len; ++k)
      if (b(i + k) < 0x80 || b(i + k) > 0xbf) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Parses JSON text strictly: valid UTF-8 (checked by the caller), no duplicate keys, bounded
// nesting. nlohmann errors become tqkv::Error naming `what`.
json parse_json(std::string_view text, std::string_view name, std::string_view what) {
  std::vector<std::set<std::string>> keys;  // keys[d]: keys seen in the open object at depth d
  const json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    using E = json::parse_event_t;
    if (event == E::object_start || event == E::array_start) {
      TQKV_CHECK(depth < kMaxJsonDepth, name, ": ", what, " is nested more than ", kMaxJsonDepth,
                 " levels deep");
    }
    if (event == E::object_start) {
      keys.resize(size_t(depth) + 2);
      keys[size_t(depth) + 1].clear();
    } else if (event == E::key) {
      TQKV_ASSERT(size_t(depth) < keys.size());
      const std::string& k = parsed.get_ref<const std::string&>();
      TQKV_CHECK(keys[size_t(depth)].insert(k).second, name, ": ", what, ": duplicate key '", k,
                 "'");
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), check);
  } catch (const json::exception& e) {
    fail(name, ": ", what, " is not valid JSON: ", e.what());
  }
}

// Every key of obj is one of `expected` (all required) or `optional`.
void check_keys(const json& obj, std::initializer_list<const char*> expected,
                std::string_view name, std::string_view what,
                std::initializer_list<const char*> optional = {}) {
  std::string list;
  for (const char* k : expected) list += std::string(list.empty() ? "" : ", ") + k;
  for (const char* k : optional) list += std::string(", optional ") + k;
  for (const auto& item : obj.items()) {
    bool known = false;
    for (const char* k : expected) known = known || item.key() == k;
    for (const char* k : optional) known = known || item.key() == k;
    TQKV_CHECK(known, name, ": ", what, ": unknown key '", item.key(), "' (expected ", list, ")");
  }
  for (const char* k : expected)
    TQKV_CHECK(obj.contains(k), name, ": ", what, ": missing key '", k, "'");
}

uint64_t get_unsigned(const json& obj, const char* key, std::string_view name,
                      std::string_view what) {
  const json& v = obj.at(key);
  TQKV_CHECK(v.is_number_unsigned(), name, ": ", what, ": '", key,
             "' must be a non-negative integer, got ",
             v.is_number_integer() ? "a negative integer" : v.type_name());
  return v.get<uint64_t>();
}

std::string get_string(const json& obj, const char* key, std::string_view name,
                       std::string_view what) {
  const json& v = obj.at(key);
  TQKV_CHECK(v.is_string(), name, ": ", what, ": '", key, "' must be a string, got ",
             v.type_name());
  return v.get<std::string>();
}

// Enum names go through codec.hpp's parsers; their errors get the file name.
template <class F>
auto parse_name(F parse, const json& obj, const char* key, std::string_view name) {
  const std::string s = get_string(obj, key, name, "codec spec");
  try {
    return parse(s);
  } catch (const Error& e) {
    fail(name, ": codec spec: '", key, "': ", e.what());
  }
}

CodecSpec spec_from_value(const json& j, std::string_view name) {
  constexpr std::string_view what = "codec spec";
  TQKV_CHECK(j.is_object(), name, ": ", what, " must be a JSON object, got ", j.type_name());
  // "center" and "offset" are optional (files written before centering existed lack them).
  check_keys(j, {"dim", "bits", "kind", "rotation", "seed", "norm_format", "outlier_channels"},
             name, what, {"center", "offset"});
  CodecSpec spec;
  const uint64_t dim = get_unsigned(j, "dim", name, what);
  TQKV_CHECK(dim >= 2 && dim <= uint64_t(kMaxCodecDim), name, ": ", what, ": 'dim' is ", dim,
             " (expected 2..", kMaxCodecDim, ")");
  spec.dim = int(dim);

  const json& bits = j.at("bits");
  TQKV_CHECK(bits.is_number(), name, ": ", what, ": 'bits' must be a number, got ",
             bits.type_name());
  spec.bits = bits.get<double>();
  // Range only (1..9 covers mse and prod); Codec checks the rest.
  TQKV_CHECK(std::isfinite(spec.bits) && spec.bits >= 1 && spec.bits <= 9, name, ": ", what,
             ": 'bits' is ", spec.bits, " (expected 1..9)");

  spec.kind = parse_name(parse_codec_kind, j, "kind", name);
  spec.rotation = parse_name(parse_rotation_choice, j, "rotation", name);
  spec.norm_format = parse_name(parse_norm_format, j, "norm_format", name);
  spec.seed = get_unsigned(j, "seed", name, what);

  const json& ch = j.at("outlier_channels");
  TQKV_CHECK(ch.is_array(), name, ": ", what, ": 'outlier_channels' must be an array, got ",
             ch.type_name());
  TQKV_CHECK(ch.size() < dim, name, ": ", what, ": ", ch.size(),
             " outlier channels at dim ", dim, " (expected fewer than dim)");
  for (size_t i = 0; i < ch.size(); ++i) {
    TQKV_CHECK(ch[i].is_number_unsigned() && ch[i].get<uint64_t>() < dim, name, ": ", what,
               ": outlier_channels[", i, "] must be a channel index in 0..", dim - 1);
    const int c = int(ch[i].get<uint64_t>());
    // Ascending, as Codec::spec() reports them, so a spec survives a round trip unchanged.
    TQKV_CHECK(spec.outlier_channels.empty() || c > spec.outlier_channels.back(), name, ": ",
               what, ": outlier_channels must be strictly ascending (", c, " after ",
               spec.outlier_channels.empty() ? 0 : spec.outlier_channels.back(), ")");
    spec.outlier_channels.push_back(c);
  }
  if (j.contains("center")) {
    TQKV_CHECK(j["center"].is_boolean(), name, ": ", what, ": 'center' must be true or false, got ",
               j["center"].type_name());
    spec.center = j["center"].get<bool>();
  }
  if (j.contains("offset")) {
    const json& off = j["offset"];
    TQKV_CHECK(off.is_array() && (off.empty() || off.size() == dim), name, ": ", what,
               ": 'offset' must be an array of ", dim, " numbers (or empty)");
    TQKV_CHECK(spec.center || off.empty(), name, ": ", what, ": 'offset' given but 'center' is ",
               "false");
    for (size_t i = 0; i < off.size(); ++i) {
      const float x = off[i].is_number() ? float(off[i].get<double>()) : NAN;
      TQKV_CHECK(std::isfinite(x), name, ": ", what, ": offset[", i,
                 "] must be a finite number in float32's range");
      spec.offset.push_back(x);
    }
  }
  return spec;
}

ordered_json spec_to_value(const CodecSpec& spec) {
  // Light checks so that we never write a spec that spec_from_json would reject.
  TQKV_CHECK(spec.dim >= 2 && spec.dim <= kMaxCodecDim, "spec_to_json: dim ", spec.dim,
             " is outside 2..", kMaxCodecDim);
  TQKV_CHECK(std::isfinite(spec.bits) && spec.bits >= 1 && spec.bits <= 9,
             "spec_to_json: bits ", spec.bits, " is outside 1..9");
  TQKV_CHECK(spec.kind == CodecKind::mse || spec.kind == CodecKind::prod,
             "spec_to_json: unknown codec kind ", int(spec.kind));
  TQKV_CHECK(int(spec.rotation) <= 2, "spec_to_json: unknown rotation ", int(spec.rotation));
  TQKV_CHECK(spec.norm_format == NormFormat::f16 || spec.norm_format == NormFormat::f32,
             "spec_to_json: unknown norm format ", int(spec.norm_format));
  ordered_json channels = ordered_json::array();
  for (size_t i = 0; i < spec.outlier_channels.size(); ++i) {
    const int c = spec.outlier_channels[i];
    TQKV_CHECK(c >= 0 && c < spec.dim && (i == 0 || c > spec.outlier_channels[i - 1]),
               "spec_to_json: outlier channels must be ascending indices in 0..", spec.dim - 1);
    channels.push_back(c);
  }
  ordered_json j;
  j["dim"] = spec.dim;
  j["bits"] = spec.bits;
  j["kind"] = to_string(spec.kind);
  j["rotation"] = to_string(spec.rotation);
  j["seed"] = spec.seed;
  j["norm_format"] = to_string(spec.norm_format);
  j["outlier_channels"] = std::move(channels);
  if (spec.center) {  // absent for codecs that do not center, as before centering existed
    TQKV_CHECK(spec.offset.empty() || spec.offset.size() == size_t(spec.dim),
               "spec_to_json: the offset has ", spec.offset.size(), " elements for dim ",
               spec.dim);
    ordered_json off = ordered_json::array();
    for (float x : spec.offset) {
      TQKV_CHECK(std::isfinite(x), "spec_to_json: the offset holds a non-finite value");
      off.push_back(double(x));  // a float survives the round trip through a double exactly
    }
    j["center"] = true;
    j["offset"] = std::move(off);
  }
  return j;
}

struct Parsed {
  Container container;
  json metadata;
};

Parsed parse_impl(std::span<const uint8_t> bytes, std::string_view name) {
  const size_t size = bytes.size();
  const uint8_t* p = bytes.data();
  // A prefix of the magic is a truncated tqkv file, anything else is not ours.
  const size_t magic_len = std::min(size, sizeof kMagic);
  TQKV_CHECK(magic_len == 0 || std::memcmp(p, kMagic, magic_len) == 0, name,
             ": not a tqkv file (bad magic)");
  TQKV_CHECK(size >= 12, name, ": truncated: the file is ", size,
             " bytes and ends inside the ", kPreambleBytes, "-byte preamble");
  // Before the preamble hash: another version may lay the preamble out differently.
  const uint32_t version = get_u32(p + 8);
  TQKV_CHECK(version == kVersion, name, ": unsupported format version ", version,
             " (this build reads version ", kVersion, ")");
  TQKV_CHECK(size >= kPreambleBytes, name, ": truncated: the file is ", size,
             " bytes and ends inside the ", kPreambleBytes, "-byte preamble");
  TQKV_CHECK(hash(p, 48) == get_u64(p + 48), name, ": checksum mismatch in preamble",
             " (file corrupted)");

  const uint32_t kind = get_u32(p + 12);
  TQKV_CHECK(known_kind(Kind(kind)), name, ": unsupported file kind ", kind,
             " (this build reads kinds 1: encoded vectors and 2: KV cache)");
  const uint64_t m = get_u64(p + 16), n = get_u64(p + 24);
  const size_t after = size - kPreambleBytes;
  TQKV_CHECK(m <= after, name, ": truncated: header promises ", m, " bytes of metadata, file has ",
             after);
  TQKV_CHECK(n <= after - m, name, ": truncated: header promises ", n,
             " bytes of payload, file has ", after - m);
  TQKV_CHECK(n == after - m, name, ": ", after - m - n,
             " unexpected bytes after the payload (header promises ", kPreambleBytes + m + n,
             " bytes in all, file has ", size, ")");
  const uint8_t* meta = p + kPreambleBytes;
  const uint8_t* payload = meta + m;
  TQKV_CHECK(hash(meta, m) == get_u64(p + 32), name, ": checksum mismatch in metadata",
             " (file corrupted)");
  TQKV_CHECK(hash(payload, n) == get_u64(p + 40), name, ": checksum mismatch in payload",
             " (file corrupted)");

  Parsed out;
  out.container.kind = Kind(kind);
  out.container.metadata.assign(reinterpret_cast<const char*>(meta), m);
  const size_t bad = invalid_utf8_at(out.container.metadata);
  TQKV_CHECK(bad == std::string_view::npos, name, ": metadata is not valid UTF-8 (at byte ", bad,
             ")");
  out.metadata = parse_json(out.container.metadata, name, "metadata");
  TQKV_CHECK(out.metadata.is_object(), name, ": metadata must be a JSON object, got ",
             out.metadata.type_name());
  out.container.payload.assign(payload, payload + n);
  return out;
}

}  // namespace

std::vector<uint8_t> serialize(const Container& c) {
  TQKV_CHECK(known_kind(c.kind), "file::serialize: unknown file kind ", uint32_t(c.kind));
  const size_t m = c.metadata.size(), n = c.payload.size();
  TQKV_CHECK(m <= kSizeMax - kPreambleBytes && n <= kSizeMax - kPreambleBytes - m,
             "file::serialize: the file would be larger than 2^64 bytes");
  std::vector<uint8_t> out(kPreambleBytes + m + n);
  uint8_t* p = out.data();
  std::memcpy(p, kMagic, sizeof kMagic);
  put_u32(p + 8, kVersion);
  put_u32(p + 12, uint32_t(c.kind));
  put_u64(p + 16, m);
  put_u64(p + 24, n);
  const auto* meta = reinterpret_cast<const uint8_t*>(c.metadata.data());
  put_u64(p + 32, hash(meta, m));
  put_u64(p + 40, hash(c.payload.data(), n));
  put_u64(p + 48, hash(p, 48));
  if (m) std::memcpy(p + kPreambleBytes, meta, m);  // memcpy from null is UB even for 0 bytes
  if (n) std::memcpy(p + kPreambleBytes + m, c.payload.data(), n);
  return out;
}

Container parse(std::span<const uint8_t> bytes, std::string_view name) {
  return std::move(parse_impl(bytes, name).container);
}

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::error_code ec;
  TQKV_CHECK(!fs::is_directory(path, ec), "cannot read '", path.string(), "': is a directory");
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  TQKV_CHECK(in, "cannot open '", path.string(), "': ", errno_text(errno));
  std::vector<uint8_t> bytes;
  if (const auto sz = fs::file_size(path, ec); !ec) bytes.reserve(sz);
  constexpr size_t kChunk = size_t(1) << 20;
  while (in) {
    const size_t old = bytes.size();
    bytes.resize(old + kChunk);
    in.read(reinterpret_cast<char*>(bytes.data() + old), std::streamsize(kChunk));
    bytes.resize(old + size_t(in.gcount()));
  }
  TQKV_CHECK(!in.bad(), "cannot read '", path.string(), "': ", errno_text(errno));
  return bytes;
}

void write_bytes(const fs::path& path, std::span<const uint8_t> bytes) {
  fs::path tmp = path;
  tmp += ".tmp";
  std::error_code ignored;
  {
    errno = 0;
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TQKV_CHECK(out, "cannot write '", path.string(), "': cannot create '", tmp.string(), "': ",
               errno_text(errno));
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    out.close();  // flushes, so a full disk shows up here
    if (!out) {
      const int e = errno;
      fs::remove(tmp, ignored);
      fail("cannot write '", tmp.string(), "': ", errno_text(e));
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ignored);
    fail("cannot write '", path.string(), "': rename from '", tmp.string(), "' failed: ",
         ec.message());
  }
}

std::string spec_to_json(const CodecSpec& spec) { return spec_to_value(spec).dump(); }

CodecSpec spec_from_json(std::string_view text, std::string_view name) {
  const size_t bad = invalid_utf8_at(text);
  TQKV_CHECK(bad == std::string_view::npos, name, ": codec spec is not valid UTF-8 (at byte ",
             bad, ")");
  return spec_from_value(parse_json(text, name, "codec spec"), name);
}

std::vector<uint8_t> serialize_encoded(const EncodedVectors& ev) {
  TQKV_CHECK(ev.record_bytes > 0, "serialize_encoded: record_bytes is 0");
  TQKV_CHECK(ev.count <= ev.records.size() / ev.record_bytes &&
                 ev.count * ev.record_bytes == ev.records.size(),
             "serialize_encoded: ", ev.records.size(), " bytes of records, but count ", ev.count,
             " x record_bytes ", ev.record_bytes, " needs ",
             ev.count <= kSizeMax / ev.record_bytes ? std::to_string(ev.count * ev.record_bytes)
                                                    : std::string("more than 2^64"));
  ordered_json meta;
  meta["codec"] = spec_to_value(ev.spec);
  meta["count"] = uint64_t(ev.count);
  meta["record_bytes"] = uint64_t(ev.record_bytes);
  meta["tqkv_version"] = kTqkvVersion;
  Container c;
  c.kind = Kind::encoded_vectors;
  c.metadata = meta.dump();
  c.payload = ev.records;
  return serialize(c);
}

EncodedVectors parse_encoded(std::span<const uint8_t> bytes, std::string_view name) {
  Parsed parsed = parse_impl(bytes, name);
  Container& c = parsed.container;
  const json& meta = parsed.metadata;
  TQKV_CHECK(c.kind == Kind::encoded_vectors, name, ": file kind ", uint32_t(c.kind),
             " is not encoded vectors");
  constexpr std::string_view what = "metadata";
  check_keys(meta, {"codec", "count", "record_bytes", "tqkv_version"}, name, what);
  EncodedVectors ev;
  ev.spec = spec_from_value(meta.at("codec"), name);
  const uint64_t count = get_unsigned(meta, "count", name, what);
  const uint64_t record_bytes = get_unsigned(meta, "record_bytes", name, what);
  get_string(meta, "tqkv_version", name, what);  // informational; any writer version is read

  std::optional<Codec> codec;
  try {
    codec.emplace(ev.spec);
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
  if (!codec->ready()) {
    if (ev.spec.bits != std::floor(ev.spec.bits) && ev.spec.outlier_channels.empty())
      fail(name, ": the codec has fractional bits (", ev.spec.bits,
           ") but no outlier_channels; encoded data cannot be decoded without them");
    fail(name, ": the codec centers but has no offset; encoded data cannot be decoded without it");
  }
  TQKV_CHECK(record_bytes == codec->record_bytes(), name, ": record_bytes is ", record_bytes,
             " but this codec (dim ", ev.spec.dim, ", ", to_string(ev.spec.kind), ", ",
             ev.spec.bits, " bits, norm ", to_string(ev.spec.norm_format), ") has ",
             codec->record_bytes(), "-byte records");
  const size_t payload = c.payload.size();
  TQKV_CHECK(count <= payload / record_bytes && count * record_bytes == payload, name,
             ": payload is ", payload, " bytes, but count ", count, " x record_bytes ",
             record_bytes, " needs ",
             count <= kSizeMax / record_bytes ? std::to_string(count * record_bytes)
                                              : std::string("more than 2^64"));
  ev.count = size_t(count);
  ev.record_bytes = size_t(record_bytes);
  ev.records = std::move(c.payload);
  return ev;
}

void write_encoded(const fs::path& path, const EncodedVectors& ev) {
  write_bytes(path, serialize_encoded(ev));  // validate before any I/O
}

EncodedVectors read_encoded(const fs::path& path) {
  return parse_encoded(read_bytes(path), path.string());
}

}  // namespace tqkv::file

namespace tqkv::file {

std::vector<uint8_t> serialize_cache(const SavedCache& saved) {
  ordered_json meta;
  meta["layers"] = saved.layers;
  meta["kv_heads"] = saved.kv_heads;
  meta["head_dim"] = saved.head_dim;
  meta["page_tokens"] = saved.page_tokens;
  meta["max_pages"] = saved.max_pages;
  meta["page_bytes"] = saved.page_bytes;
  meta["key"] = spec_to_value(saved.key);
  meta["value"] = spec_to_value(saved.value);
  for (const char* side : {"key_codecs", "value_codecs"}) {
    ordered_json list = ordered_json::array();
    for (const CodecSpec& spec : side[0] == 'k' ? saved.key_specs : saved.value_specs)
      list.push_back(spec_to_value(spec));
    meta[side] = std::move(list);
  }
  ordered_json seqs = ordered_json::array();
  uint64_t pages = 0;
  for (const auto& s : saved.sequences) {
    ordered_json j;
    j["id"] = s.id;
    j["lengths"] = s.lengths;
    j["pages"] = s.pages;
    seqs.push_back(std::move(j));
    pages += s.pages;
  }
  meta["sequences"] = std::move(seqs);
  meta["next_id"] = saved.next_id;
  meta["tqkv_version"] = kTqkvVersion;
  TQKV_CHECK(saved.page_bytes > 0 && pages <= saved.payload.size() / saved.page_bytes &&
                 pages * saved.page_bytes == saved.payload.size(),
             "serialize_cache: payload of ", saved.payload.size(), " bytes for ", pages,
             " pages of ", saved.page_bytes);
  Container c;
  c.kind = Kind::kv_cache;
  c.metadata = meta.dump();
  c.payload = saved.payload;
  return serialize(c);
}

SavedCache parse_cache(std::span<const uint8_t> bytes, std::string_view name) {
  Parsed parsed = parse_impl(bytes, name);
  const json& meta = parsed.metadata;
  TQKV_CHECK(parsed.container.kind == Kind::kv_cache, name, ": file kind ",
             uint32_t(parsed.container.kind), " is not a KV cache");
  constexpr std::string_view what = "metadata";
  check_keys(meta,
             {"layers", "kv_heads", "head_dim", "page_tokens", "max_pages", "page_bytes", "key",
              "value", "key_codecs", "value_codecs", "sequences", "next_id", "tqkv_version"},
             name, what);
  SavedCache saved;
  // Bounds here keep a hostile file from sizing anything huge; KVCache checks the rest.
  auto small = [&](const char* key, uint64_t max) {
    const uint64_t v = get_unsigned(meta, key, name, what);
    TQKV_CHECK(v <= max, name, ": ", what, ": '", key, "' is ", v, " (at most ", max, ")");
    return v;
  };
  saved.layers = int(small("layers", 4096));
  saved.kv_heads = int(small("kv_heads", 4096));
  saved.head_dim = int(small("head_dim", 4096));
  saved.page_tokens = int(small("page_tokens", 1024));
  saved.max_pages = small("max_pages", uint64_t(1) << 31);
  saved.page_bytes = small("page_bytes", uint64_t(1) << 40);
  saved.next_id = get_unsigned(meta, "next_id", name, what);
  get_string(meta, "tqkv_version", name, what);
  saved.key = spec_from_value(meta.at("key"), name);
  saved.value = spec_from_value(meta.at("value"), name);
  const uint64_t pairs = uint64_t(saved.layers) * uint64_t(saved.kv_heads);
  for (const char* side : {"key_codecs", "value_codecs"}) {
    const json& list = meta.at(side);
    TQKV_CHECK(list.is_array() && list.size() == pairs, name, ": ", what, ": '", side,
               "' must be an array of ", pairs, " codec specs (one per layer and KV head)");
    auto& specs = side[0] == 'k' ? saved.key_specs : saved.value_specs;
    for (const json& j : list) specs.push_back(spec_from_value(j, name));
  }
  const json& seqs = meta.at("sequences");
  TQKV_CHECK(seqs.is_array(), name, ": ", what, ": 'sequences' must be an array");
  uint64_t pages = 0;
  for (const json& j : seqs) {
    TQKV_CHECK(j.is_object(), name, ": ", what, ": each sequence must be an object");
    check_keys(j, {"id", "lengths", "pages"}, name, "sequence");
    SavedCache::Sequence s;
    s.id = get_unsigned(j, "id", name, "sequence");
    s.pages = get_unsigned(j, "pages", name, "sequence");
    const json& lengths = j.at("lengths");
    TQKV_CHECK(lengths.is_array() && lengths.size() == uint64_t(saved.layers), name,
               ": sequence ", s.id, ": 'lengths' must be an array of ", saved.layers, " integers");
    for (const json& n : lengths) {
      TQKV_CHECK(n.is_number_unsigned(), name, ": sequence ", s.id,
                 ": lengths must be non-negative integers");
      TQKV_CHECK(n.get<uint64_t>() <= (uint64_t(1) << 40), name, ": sequence ", s.id,
                 ": a length of ", n.get<uint64_t>(), " tokens is beyond any pool");
      s.lengths.push_back(n.get<uint64_t>());
    }
    TQKV_CHECK(s.pages <= saved.max_pages && pages <= saved.max_pages - s.pages, name,
               ": the sequences hold more pages than max_pages (", saved.max_pages, ")");
    pages += s.pages;
    saved.sequences.push_back(std::move(s));
  }
  const size_t payload = parsed.container.payload.size();
  TQKV_CHECK(saved.page_bytes > 0 && pages <= payload / saved.page_bytes &&
                 pages * saved.page_bytes == payload,
             name, ": payload is ", payload, " bytes, but ", pages, " pages of ",
             saved.page_bytes, " bytes are listed");
  saved.payload = std::move(parsed.container.payload);
  return saved;
}

}  // namespace tqkv::file
