// .npy reading and writing. The parser treats its input as hostile (it is fuzzed): every length is
// checked against the bytes actually present before it is used, and nothing is allocated until the
// header has been shown to describe exactly the bytes that follow it.
#include "tqkv/npy.hpp"

#include <bit>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>

#include "tqkv/error.hpp"
#include "tqkv/file.hpp"
#include "tqkv/half.hpp"

namespace tqkv::npy {

// Element bytes are copied as is, so the host must share the file's byte order.
static_assert(std::endian::native == std::endian::little, "tqkv requires a little-endian host");

namespace {

namespace fs = std::filesystem;

constexpr std::string_view kMagic = "\x93NUMPY";
constexpr size_t kAlign = 64;  // numpy aligns the start of the data to 64 bytes
constexpr size_t kMaxDims = 3;
constexpr size_t kSizeMax = std::numeric_limits<size_t>::max();

size_t elem_size(DType t) { return t == DType::f16 ? 2 : 4; }

// Untrusted header text as it may appear in a message: non-printable bytes become \xNN.
std::string printable(std::string_view s) {
  std::string out;
  for (const unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(c));
      out += buf;
    }
  }
  return out;
}

// The Python repr of a shape tuple: (5,), (2, 3), (2, 3, 4).
std::string shape_repr(std::span<const size_t> shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Element count, or nullopt if it overflows. Checking every prefix product also guarantees that
// Array::rows() (a prefix product) cannot overflow.
std::optional<size_t> checked_product(std::span<const size_t> shape) {
  size_t n = 1;
  for (const size_t d : shape) {
    if (d != 0 && n > kSizeMax / d) return std::nullopt;
    n *= d;
  }
  return n;
}

struct Header {
  std::string descr;
  bool fortran_order = false;
  std::vector<size_t> shape;
};

// Recursive-descent parser for the Python dict literal numpy writes as the header, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// Tolerates either quote style, any key order, optional trailing commas and whitespace padding.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, std::string_view name) : s_(text), name_(name) {}

  Header parse() {
    Header h;
    bool seen[3] = {};
    expect('{');
    skip_ws();
    while (peek() != '}') {
      const size_t key_pos = pos_;
      const std::string key = string_literal();
      const int k = key == "descr" ? 0 : key == "fortran_order" ? 1 : key == "shape" ? 2 : -1;
      if (k < 0 || seen[k]) {
        pos_ = key_pos;  // point the message at the key
        if (k < 0) fail("unknown key '", printable(key), "'");
        fail("duplicate key '", key, "'");
      }
      seen[k] = true;
      expect(':');
      if (k == 0) h.descr = string_literal();
      if (k == 1) h.fortran_order = boolean();
      if (k == 2) h.shape = tuple();
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        skip_ws();
      } else if (peek() != '}') {
        fail("expected ',' or '}'");
      }
    }
    ++pos_;
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected text after the closing '}'");
    if (!seen[0]) fail("missing key 'descr'");
    if (!seen[1]) fail("missing key 'fortran_order'");
    if (!seen[2]) fail("missing key 'shape'");
    return h;
  }

 private:
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw Error(detail::concat(name_, ": malformed header: ", parts..., " (at header offset ",
                               pos_, ")"));
  }

  // The next byte, or -1 at the end (a NUL byte in the header is a byte like any other).
  int peek() const { return pos_ < s_.size() ? static_cast<unsigned char>(s_[pos_]) : -1; }

  void skip_ws() {
    while (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r') ++pos_;
  }

  void expect(char c) {
    skip_ws();
    if (peek() != c) fail("expected '", c, "'");
    ++pos_;
  }

  std::string string_literal() {
    skip_ws();
    const int q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    const size_t end = s_.find(char(q), pos_ + 1);
    if (end == std::string_view::npos) fail("unterminated string");
    const std::string_view body = s_.substr(pos_ + 1, end - pos_ - 1);
    if (body.find('\\') != std::string_view::npos) fail("escape sequences are not supported");
    pos_ = end + 1;
    return std::string(body);
  }

  bool boolean() {
    skip_ws();
    for (const bool v : {true, false}) {
      const std::string_view word = v ? "True" : "False";
      if (s_.substr(pos_).starts_with(word)) {
        pos_ += word.size();
        return v;
      }
    }
    fail("expected True or False for 'fortran_order'");
  }

  size_t integer() {
    skip_ws();
    if (peek() == '-') fail("negative dimension in 'shape'");
    if (peek() < '0' || peek() > '9') fail("expected a dimension in 'shape'");
    size_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      const size_t digit = size_t(peek() - '0');
      if (v > (kSizeMax - digit) / 10) fail("dimension in 'shape' does not fit in 64 bits");
      v = v * 10 + digit;
      ++pos_;
    }
    if (peek() == 'L') ++pos_;  // Python 2 long literal, as old numpy wrote them
    return v;
  }

  std::vector<size_t> tuple() {
    expect('(');
    skip_ws();
    std::vector<size_t> dims;
    bool comma = false;
    while (peek() != ')') {
      dims.push_back(integer());
      skip_ws();
      comma = peek() == ',';
      if (comma) {
        ++pos_;
        skip_ws();
      } else if (peek() != ')') {
        fail("expected ',' or ')' in 'shape'");
      }
    }
    // In Python "(3)" is the integer 3, not a tuple.
    if (dims.size() == 1 && !comma) fail("'shape' is not a tuple (a 1-D shape is written (N,))");
    ++pos_;
    return dims;
  }

  std::string_view s_;
  std::string_view name_;
  size_t pos_ = 0;
};

}  // namespace

size_t Array::rows() const {
  if (shape.empty()) return 0;
  if (shape.size() == 1) return 1;
  return shape.size() == 2 ? shape[0] : shape[0] * shape[1];
}

size_t Array::cols() const { return shape.empty() ? 0 : shape.back(); }

Array parse(std::span<const uint8_t> bytes, std::string_view name) {
  const size_t size = bytes.size();
  TQKV_CHECK(size >= kMagic.size() && std::memcmp(bytes.data(), kMagic.data(), kMagic.size()) == 0,
             name, ": not a .npy file (bad magic)");
  TQKV_CHECK(size >= 8, name, ": truncated: the file ends inside the format version");
  const unsigned major = bytes[6], minor = bytes[7];
  TQKV_CHECK(major >= 1 && major <= 3 && minor == 0, name, ": unsupported .npy format version ",
             major, ".", minor, " (expected 1.0, 2.0 or 3.0)");
  const size_t len_bytes = major == 1 ? 2 : 4;
  const size_t prefix = 8 + len_bytes;
  TQKV_CHECK(size >= prefix, name, ": truncated: the file ends inside the header length");
  size_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) header_len |= size_t(bytes[8 + i]) << (8 * i);
  TQKV_CHECK(header_len <= size - prefix, name, ": truncated: header length is ", header_len,
             " bytes but only ", size - prefix, " bytes follow");

  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + prefix, header_len);
  const Header h = HeaderParser(text, name).parse();

  // '=' is native order, which is little-endian here (see the static_assert above).
  Array a;
  const std::string_view d = h.descr;
  if (d == "<f4" || d == "=f4") {
    a.stored = DType::f32;
  } else if (d == "<f2" || d == "=f2") {
    a.stored = DType::f16;
  } else {
    TQKV_CHECK(d != ">f4" && d != ">f2", name, ": big-endian dtype '", d,
               "' is not supported (convert with arr.astype('<", d.substr(1), "'))");
    TQKV_CHECK(false, name, ": unsupported dtype '", printable(d), "' (expected '<f4' or '<f2')");
  }
  TQKV_CHECK(!h.fortran_order, name, ": Fortran-order arrays are not supported",
             " (save np.ascontiguousarray(arr) instead)");
  TQKV_CHECK(!h.shape.empty() && h.shape.size() <= kMaxDims, name, ": shape ",
             shape_repr(h.shape), " has ", h.shape.size(), " dimensions (expected 1 to ", kMaxDims,
             ")");
  const std::optional<size_t> count = checked_product(h.shape);
  TQKV_CHECK(count.has_value(), name, ": shape ", shape_repr(h.shape),
             " has too many elements (the count overflows 64 bits)");

  // Size the data against the bytes present before allocating anything.
  const size_t esize = elem_size(a.stored);
  const size_t payload = size - prefix - header_len;
  const size_t n = *count;
  const std::string need = n <= kSizeMax / esize ? std::to_string(n * esize) : "more than 2^64";
  TQKV_CHECK(n <= payload / esize, name, ": truncated: header says ", n, " elements (", need,
             " bytes) but ", payload, " bytes follow the header");
  TQKV_CHECK(n * esize == payload, name, ": has ", payload - n * esize,
             " unexpected bytes after the data");

  const uint8_t* src = bytes.data() + prefix + header_len;
  a.shape = h.shape;
  a.data.resize(n);
  if (n == 0) return a;  // memcpy from/to a null pointer is UB even for zero bytes
  if (a.stored == DType::f32) {
    std::memcpy(a.data.data(), src, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, src + 2 * i, 2);  // the data need not be aligned
      a.data[i] = half_to_float(bits);
    }
  }
  return a;
}

Array read(const fs::path& path) { return parse(file::read_bytes(path), path.string()); }

std::vector<uint8_t> serialize(std::span<const float> data, std::span<const size_t> shape,
                               DType stored) {
  TQKV_CHECK(!shape.empty() && shape.size() <= kMaxDims, "npy::serialize: shape ",
             shape_repr(shape), " has ", shape.size(), " dimensions (expected 1 to ", kMaxDims,
             ")");
  const std::optional<size_t> count = checked_product(shape);
  TQKV_CHECK(count == data.size(), "npy::serialize: shape ", shape_repr(shape), " does not match ",
             data.size(), " elements");

  const std::string dict = std::string("{'descr': '") + (stored == DType::f16 ? "<f2" : "<f4") +
                           "', 'fortran_order': False, 'shape': " + shape_repr(shape) + ", }";
  // Pad with spaces, then '\n', so the data starts at a multiple of 64 bytes as numpy does.
  const auto padded_len = [&](size_t prefix) {
    const size_t len = dict.size() + 1;
    return len + (kAlign - (prefix + len) % kAlign) % kAlign;
  };
  const bool v1 = padded_len(10) <= 0xffff;
  const size_t prefix = v1 ? 10 : 12;
  const size_t header_len = padded_len(prefix);

  std::vector<uint8_t> out(kMagic.begin(), kMagic.end());
  out.push_back(v1 ? 1 : 2);
  out.push_back(0);
  for (size_t i = 0; i < prefix - 8; ++i) out.push_back(uint8_t(header_len >> (8 * i)));
  out.insert(out.end(), dict.begin(), dict.end());
  out.resize(prefix + header_len - 1, ' ');
  out.push_back('\n');

  const size_t start = out.size();
  out.resize(start + data.size() * elem_size(stored));
  if (data.empty()) return out;
  if (stored == DType::f32) {
    std::memcpy(out.data() + start, data.data(), data.size() * 4);
  } else {
    for (size_t i = 0; i < data.size(); ++i) {
      const uint16_t bits = float_to_half(data[i]);
      std::memcpy(out.data() + start + 2 * i, &bits, 2);
    }
  }
  return out;
}

void write(const fs::path& path, std::span<const float> data, std::span<const size_t> shape,
           DType stored) {
  file::write_bytes(path, serialize(data, shape, stored));  // validates before any I/O
}

}  // namespace tqkv::npy
