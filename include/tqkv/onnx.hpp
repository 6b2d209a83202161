// Reading ONNX model files: the graph's initializers (weights) and its nodes, from the protobuf
// wire format, without a protobuf or ONNX dependency. Enough of onnx.proto to load a model's
// weights and to find which node uses which tensor; nothing is executed here.
//
// Read: ModelProto.ir_version (1) and graph (7); GraphProto.node (1), name (2), initializer (5),
// input (11), output (12); NodeProto.input (1), output (2), name (3), op_type (4);
// TensorProto.dims (1, packed or not), data_type (2), float_data (4), int32_data (5),
// int64_data (7), name (8), raw_data (9), data_location (14: external data is refused);
// ValueInfoProto.name (1). Every other field is skipped by its wire type.
//
// Every malformed input (truncated, overlong varint, length past its message, group wire types,
// tensor data that disagrees with its dims and type, nesting deeper than onnx.proto's) throws
// tqkv::Error naming the file and where in the message it failed; fuzz/fuzz_onnx.cpp checks it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tqkv::onnx {

/// TensorProto.DataType values this reader understands (others are kept, with their raw bytes).
enum class DataType : int32_t {
  undefined = 0,
  float32 = 1,
  uint8 = 2,
  int8 = 3,
  uint16 = 4,
  int16 = 5,
  int32 = 6,
  int64 = 7,
  boolean = 9,
  float16 = 10,
  float64 = 11,
  uint32 = 12,
  uint64 = 13,
  bfloat16 = 16,
};

/// Bytes of one element of `type`, or 0 for types without a fixed size (strings, complex).
size_t element_bytes(DataType type);
std::string to_string(DataType type);

/// One initializer. Its data is either `raw` (little-endian, into the model's bytes) or, for
/// files that use the typed fields, `floats` (float_data) or `ints` (int32_data / int64_data).
struct Tensor {
  std::string name;
  std::vector<int64_t> dims;
  DataType type = DataType::undefined;
  std::span<const uint8_t> raw;
  std::vector<float> floats;
  std::vector<int64_t> ints;

  /// Product of dims (1 for a scalar).
  size_t elements() const;
  /// The elements widened to float32: float32 / float16 / bfloat16 / int8 / uint8 / int32 /
  /// int64. Throws tqkv::Error for other types.
  std::vector<float> to_floats() const;
  /// A scalar (one element) as float64. Throws unless elements() == 1.
  double scalar() const;
};

struct Node {
  std::string name, op_type;
  std::vector<std::string> inputs, outputs;
};

/// A parsed model. Move-only: the initializers' `raw` spans point into `bytes`.
struct Model {
  std::vector<uint8_t> bytes;
  std::string name;  // the file, for error messages
  int64_t ir_version = 0;
  std::string graph_name;
  std::vector<Node> nodes;
  std::vector<Tensor> initializers;
  std::vector<std::string> inputs, outputs;  // graph input and output names

  Model() = default;
  Model(Model&&) = default;
  Model& operator=(Model&&) = default;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  /// The initializer called `name`, or nullptr.
  const Tensor* find(std::string_view name) const;
  /// The initializer called `name`; throws tqkv::Error naming the file and the tensor if absent.
  const Tensor& at(std::string_view name) const;
};

/// Parses the bytes of an ONNX file (taking them over). `name` is used in error messages.
Model parse(std::vector<uint8_t> bytes, std::string name);

/// Reads an ONNX file. Throws tqkv::Error naming the path (missing, unreadable, malformed).
Model read(const std::filesystem::path& path);

/// The fields this reader reads, written back in the wire format (raw data as raw_data, typed
/// values as packed float_data / int64_data): parsing the result gives the same model. For
/// tests, fuzzing and small synthetic models.
std::vector<uint8_t> serialize(const Model& model);

}  // namespace tqkv::onnx
