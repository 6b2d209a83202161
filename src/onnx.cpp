// ONNX reader (onnx.hpp): a bounds-checked walk over the protobuf wire format.
#include "tqkv/onnx.hpp"

#include <cstring>
#include <utility>

#include "tqkv/error.hpp"
#include "tqkv/file.hpp"
#include "tqkv/half.hpp"

namespace tqkv::onnx {

namespace {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kBytes = 2, kFixed32 = 5 };

// One message's bytes, read field by field. `where` names the message for errors
// ("graph.initializer[3]").
class Reader {
 public:
  Reader(std::span<const uint8_t> bytes, const std::string& file, std::string where, size_t base)
      : p_(bytes.data()), end_(bytes.data() + bytes.size()), file_(file), where_(std::move(where)),
        base_(base), start_(bytes.data()) {}

  bool done() const { return p_ == end_; }
  size_t offset() const { return base_ + size_t(p_ - start_); }
  const std::string& where() const { return where_; }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      need(1, "a varint");
      const uint8_t b = *p_++;
      if (shift == 63 && b > 1) fail("a varint longer than 64 bits");
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("a varint longer than 10 bytes");
  }

  // The next field's number and wire type.
  std::pair<uint32_t, uint32_t> key() {
    const uint64_t k = varint();
    const uint32_t field = uint32_t(k >> 3), type = uint32_t(k & 7);
    if (field == 0 || k >> 3 > 0x1fffffffu) fail("a field number out of range");
    if (type != kVarint && type != kFixed64 && type != kBytes && type != kFixed32)
      fail(detail::concat("wire type ", type, " (groups are not used by ONNX)"));
    return {field, type};
  }

  std::span<const uint8_t> bytes() {
    const uint64_t n = varint();
    if (n > uint64_t(end_ - p_)) fail(detail::concat("a length of ", n, " past the message's end"));
    const std::span<const uint8_t> out(p_, size_t(n));
    p_ += n;
    return out;
  }
  std::string string() {
    const auto b = bytes();
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  }
  uint32_t fixed32() {
    need(4, "a 32-bit value");
    uint32_t v;
    std::memcpy(&v, p_, 4);
    p_ += 4;
    return v;
  }

  void skip(uint32_t type) {
    switch (type) {
      case kVarint: varint(); break;
      case kFixed64: need(8, "a 64-bit value"); p_ += 8; break;
      case kBytes: bytes(); break;
      default: fixed32(); break;
    }
  }
  void expect(uint32_t type, uint32_t wanted, const char* field) {
    if (type != wanted) fail(detail::concat("field ", field, " with wire type ", type));
  }

  // A reader over a nested message just read with bytes().
  Reader nested(std::span<const uint8_t> b, const std::string& where) const {
    return Reader(b, file_, where, base_ + size_t(b.data() - start_));
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(detail::concat("ONNX file ", file_, ": ", what, " at byte ", offset(), " (in ",
                               where_, ")"));
  }

 private:
  void need(size_t n, const char* what) {
    if (size_t(end_ - p_) < n) fail(detail::concat("truncated ", what));
  }
  const uint8_t* p_;
  const uint8_t* end_;
  const std::string& file_;
  std::string where_;
  size_t base_;
  const uint8_t* start_;
};

// Repeated int64 in either encoding: packed (one length-delimited run) or one varint each.
void read_ints(Reader& r, uint32_t type, std::vector<int64_t>& out) {
  if (type == kVarint) {
    out.push_back(int64_t(r.varint()));
    return;
  }
  r.expect(type, kBytes, "of repeated integers");
  Reader run = r.nested(r.bytes(), r.where());
  while (!run.done()) out.push_back(int64_t(run.varint()));
}

// int32_data holds int32 values as varints (negative ones sign-extended to 64 bits).
void read_int32s(Reader& r, uint32_t type, std::vector<int64_t>& out) {
  const size_t first = out.size();
  read_ints(r, type, out);
  for (size_t i = first; i < out.size(); ++i) out[i] = int64_t(int32_t(uint32_t(out[i])));
}

void read_floats(Reader& r, uint32_t type, std::vector<float>& out) {
  auto one = [&](Reader& from) {
    const uint32_t bits = from.fixed32();
    float f;
    std::memcpy(&f, &bits, 4);
    out.push_back(f);
  };
  if (type == kFixed32) {
    one(r);
    return;
  }
  r.expect(type, kBytes, "float_data");
  Reader run = r.nested(r.bytes(), r.where());
  while (!run.done()) one(run);
}

Tensor read_tensor(Reader r) {
  Tensor t;
  bool have_raw = false;
  while (!r.done()) {
    const auto [field, type] = r.key();
    switch (field) {
      case 1: read_ints(r, type, t.dims); break;
      case 2: r.expect(type, kVarint, "data_type"); t.type = DataType(int32_t(r.varint())); break;
      case 4: read_floats(r, type, t.floats); break;
      case 5: read_int32s(r, type, t.ints); break;
      case 7: read_ints(r, type, t.ints); break;
      case 8: r.expect(type, kBytes, "name"); t.name = r.string(); break;
      case 9:
        r.expect(type, kBytes, "raw_data");
        t.raw = r.bytes();
        have_raw = true;
        break;
      case 14:
        r.expect(type, kVarint, "data_location");
        if (r.varint() != 0) r.fail("tensor data in an external file (not supported)");
        break;
      default: r.skip(type);
    }
  }
  const std::string what = "tensor '" + t.name + "'";
  size_t n = 1;
  for (int64_t d : t.dims) {
    if (d < 0 || (d > 0 && n > (size_t(1) << 40) / size_t(d)))
      r.fail(detail::concat(what, " has dimension ", d));
    n *= size_t(d);
  }
  const size_t width = element_bytes(t.type);
  if (have_raw) {
    if (width == 0) r.fail(detail::concat(what, " of type ", to_string(t.type), " as raw data"));
    if (t.raw.size() != n * width)
      r.fail(detail::concat(what, " has ", t.raw.size(), " bytes of data for ", n, " elements of ",
                            width, " bytes"));
  } else if (!t.floats.empty() || !t.ints.empty()) {
    const size_t have = t.floats.size() + t.ints.size();
    if (have != n) r.fail(detail::concat(what, " has ", have, " values for ", n, " elements"));
  }
  return t;
}

Node read_node(Reader r) {
  Node n;
  while (!r.done()) {
    const auto [field, type] = r.key();
    switch (field) {
      case 1: r.expect(type, kBytes, "input"); n.inputs.push_back(r.string()); break;
      case 2: r.expect(type, kBytes, "output"); n.outputs.push_back(r.string()); break;
      case 3: r.expect(type, kBytes, "name"); n.name = r.string(); break;
      case 4: r.expect(type, kBytes, "op_type"); n.op_type = r.string(); break;
      default: r.skip(type);
    }
  }
  return n;
}

std::string read_value_name(Reader r) {
  std::string name;
  while (!r.done()) {
    const auto [field, type] = r.key();
    if (field == 1) {
      r.expect(type, kBytes, "name");
      name = r.string();
    } else {
      r.skip(type);
    }
  }
  return name;
}

void read_graph(Reader r, Model& m) {
  while (!r.done()) {
    const auto [field, type] = r.key();
    if (field != 1 && field != 2 && field != 5 && field != 11 && field != 12) {
      r.skip(type);
      continue;
    }
    r.expect(type, kBytes, "of the graph");
    const auto b = r.bytes();
    switch (field) {
      case 1:
        m.nodes.push_back(
            read_node(r.nested(b, detail::concat("graph.node[", m.nodes.size(), "]"))));
        break;
      case 2: m.graph_name.assign(reinterpret_cast<const char*>(b.data()), b.size()); break;
      case 5:
        m.initializers.push_back(read_tensor(
            r.nested(b, detail::concat("graph.initializer[", m.initializers.size(), "]"))));
        break;
      case 11:
        m.inputs.push_back(read_value_name(
            r.nested(b, detail::concat("graph.input[", m.inputs.size(), "]"))));
        break;
      default:
        m.outputs.push_back(read_value_name(
            r.nested(b, detail::concat("graph.output[", m.outputs.size(), "]"))));
    }
  }
}

// --- writing ---------------------------------------------------------------------------------
void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(uint8_t(v | 0x80));
    v >>= 7;
  }
  out.push_back(uint8_t(v));
}
void put_key(std::vector<uint8_t>& out, uint32_t field, uint32_t type) {
  put_varint(out, uint64_t(field) << 3 | type);
}
void put_bytes(std::vector<uint8_t>& out, uint32_t field, std::span<const uint8_t> b) {
  put_key(out, field, kBytes);
  put_varint(out, b.size());
  out.insert(out.end(), b.begin(), b.end());
}
void put_string(std::vector<uint8_t>& out, uint32_t field, std::string_view s) {
  put_bytes(out, field, {reinterpret_cast<const uint8_t*>(s.data()), s.size()});
}
void put_packed_ints(std::vector<uint8_t>& out, uint32_t field, std::span<const int64_t> v) {
  std::vector<uint8_t> run;
  for (int64_t x : v) put_varint(run, uint64_t(x));
  put_bytes(out, field, run);
}

std::vector<uint8_t> tensor_bytes(const Tensor& t) {
  std::vector<uint8_t> out;
  put_packed_ints(out, 1, t.dims);
  put_key(out, 2, kVarint);
  put_varint(out, uint64_t(int64_t(t.type)));
  put_string(out, 8, t.name);
  if (!t.raw.empty()) put_bytes(out, 9, t.raw);
  if (!t.floats.empty()) {
    std::vector<uint8_t> run(t.floats.size() * 4);
    std::memcpy(run.data(), t.floats.data(), run.size());
    put_bytes(out, 4, run);
  }
  if (!t.ints.empty()) put_packed_ints(out, 7, t.ints);  // int64_data holds any of them
  return out;
}

}  // namespace

std::vector<uint8_t> serialize(const Model& m) {
  std::vector<uint8_t> graph;
  for (const Node& n : m.nodes) {
    std::vector<uint8_t> b;
    for (const auto& s : n.inputs) put_string(b, 1, s);
    for (const auto& s : n.outputs) put_string(b, 2, s);
    put_string(b, 3, n.name);
    put_string(b, 4, n.op_type);
    put_bytes(graph, 1, b);
  }
  put_string(graph, 2, m.graph_name);
  for (const Tensor& t : m.initializers) put_bytes(graph, 5, tensor_bytes(t));
  for (int io = 0; io < 2; ++io)
    for (const auto& s : io ? m.outputs : m.inputs) {
      std::vector<uint8_t> b;
      put_string(b, 1, s);
      put_bytes(graph, io ? 12 : 11, b);
    }
  std::vector<uint8_t> out;
  put_key(out, 1, kVarint);
  put_varint(out, uint64_t(m.ir_version));
  put_bytes(out, 7, graph);
  return out;
}

size_t element_bytes(DataType type) {
  switch (type) {
    case DataType::uint8:
    case DataType::int8:
    case DataType::boolean: return 1;
    case DataType::uint16:
    case DataType::int16:
    case DataType::float16:
    case DataType::bfloat16: return 2;
    case DataType::float32:
    case DataType::int32:
    case DataType::uint32: return 4;
    case DataType::int64:
    case DataType::uint64:
    case DataType::float64: return 8;
    default: return 0;
  }
}

std::string to_string(DataType type) {
  switch (type) {
    case DataType::float32: return "float32";
    case DataType::uint8: return "uint8";
    case DataType::int8: return "int8";
    case DataType::uint16: return "uint16";
    case DataType::int16: return "int16";
    case DataType::int32: return "int32";
    case DataType::int64: return "int64";
    case DataType::boolean: return "bool";
    case DataType::float16: return "float16";
    case DataType::float64: return "float64";
    case DataType::uint32: return "uint32";
    case DataType::uint64: return "uint64";
    case DataType::bfloat16: return "bfloat16";
    default: return detail::concat("type ", int32_t(type));
  }
}

size_t Tensor::elements() const {
  size_t n = 1;
  for (int64_t d : dims) n *= size_t(d);
  return n;
}

std::vector<float> Tensor::to_floats() const {
  const size_t n = elements();
  std::vector<float> out(n);
  if (raw.empty() && n > 0) {
    TQKV_CHECK(floats.size() == n || ints.size() == n, "tensor '", name, "' has no data");
    for (size_t i = 0; i < n; ++i) out[i] = floats.size() == n ? floats[i] : float(ints[i]);
    return out;
  }
  auto load = [&](auto zero, size_t i) {
    decltype(zero) v;
    std::memcpy(&v, raw.data() + i * sizeof(v), sizeof(v));
    return v;
  };
  for (size_t i = 0; i < n; ++i) {
    switch (type) {
      case DataType::float32: out[i] = load(float{}, i); break;
      case DataType::float16: out[i] = half_to_float(load(uint16_t{}, i)); break;
      case DataType::bfloat16: out[i] = bf16_to_float(load(uint16_t{}, i)); break;
      case DataType::int8: out[i] = float(load(int8_t{}, i)); break;
      case DataType::uint8: out[i] = float(load(uint8_t{}, i)); break;
      case DataType::int32: out[i] = float(load(int32_t{}, i)); break;
      case DataType::int64: out[i] = float(load(int64_t{}, i)); break;
      default:
        throw Error(detail::concat("tensor '", name, "' of type ", to_string(type),
                                   " cannot be read as float32"));
    }
  }
  return out;
}

double Tensor::scalar() const {
  TQKV_CHECK(elements() == 1, "tensor '", name, "' is not a scalar (", elements(), " elements)");
  return double(to_floats()[0]);
}

const Tensor* Model::find(std::string_view want) const {
  for (const Tensor& t : initializers)
    if (t.name == want) return &t;
  return nullptr;
}

const Tensor& Model::at(std::string_view want) const {
  const Tensor* t = find(want);
  TQKV_CHECK(t != nullptr, "ONNX file ", name, ": no initializer '", want, "'");
  return *t;
}

Model parse(std::vector<uint8_t> bytes, std::string name) {
  Model m;
  m.bytes = std::move(bytes);
  m.name = std::move(name);
  Reader r(m.bytes, m.name, "model", 0);
  bool have_graph = false;
  while (!r.done()) {
    const auto [field, type] = r.key();
    if (field == 1) {
      r.expect(type, kVarint, "ir_version");
      m.ir_version = int64_t(r.varint());
    } else if (field == 7) {
      r.expect(type, kBytes, "graph");
      TQKV_CHECK(!have_graph, "ONNX file ", m.name, ": two graphs");
      read_graph(r.nested(r.bytes(), "graph"), m);
      have_graph = true;
    } else {
      r.skip(type);
    }
  }
  TQKV_CHECK(have_graph, "ONNX file ", m.name, ": no graph (not an ONNX model)");
  return m;
}

Model read(const std::filesystem::path& path) {
  return parse(file::read_bytes(path), path.string());
}

}  // namespace tqkv::onnx
