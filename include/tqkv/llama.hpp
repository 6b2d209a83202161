// A Llama-architecture language model on the CPU, with its KV cache behind an interface: the
// harness that shows what a compressed cache costs a real model's predictions.
//
// Loaded from an ONNX file of the layout that int8 dynamic quantization exports (onnx.hpp):
// weights W [in, out] int8 with a per-tensor scale and zero point (W = (q − zp) · scale), named
// after the MatMulInteger nodes that use them (/model/model/layers.N/self_attn/{q,k,v,o}_proj,
// mlp/{gate,up,down}_proj, /model/lm_head); the token embedding uint8 with a scale and zero
// point; RMSNorm weights float32. The forward pass follows that graph: every projection's input
// is quantized on the fly to uint8 per tensor (DynamicQuantizeLinear: the whole [tokens, in]
// input of the call shares one scale and zero point), multiplied in integers (MatMulInteger) and
// scaled back; RMSNorm, rotary embeddings (rotate-half), causal GQA attention and the SiLU-gated
// MLP run in float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "tqkv/cache.hpp"

namespace tqkv {

namespace onnx {
struct Model;
}

struct LlamaConfig {
  int layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0, vocab = 0;
  double rms_eps = 1e-5;
  double rope_theta = 100000.0;
};

/// y = x · W with W int8 [in, out] = (q − zero_point) · scale.
struct QuantizedLinear {
  int in = 0, out = 0;
  std::vector<int8_t> q;  // [in][out]
  float scale = 0.0f;
  int zero_point = 0;
  /// x [rows, in] → y [rows, out]. With quantize_input, x is first quantized like
  /// DynamicQuantizeLinear over all its rows and multiplied in integers (the exported graph);
  /// without, x stays float32 (the weights' own precision, no activation rounding).
  void apply(const float* x, size_t rows, float* y, bool quantize_input = true) const;
};

/// Where the model keeps one sequence's keys (after rotary embedding) and values.
class KvStore {
 public:
  virtual ~KvStore() = default;
  /// Tokens stored at `layer`.
  virtual size_t length(int layer) const = 0;
  /// Appends `tokens` tokens' k and v ([tokens, kv_heads, head_dim]) at `layer`, then computes
  /// causal attention for the same tokens' queries q ([tokens, heads, head_dim], softmax scale
  /// 1/√head_dim) over everything stored at `layer`, into out (like q).
  virtual void append_and_attend(int layer, size_t tokens, const float* k, const float* v,
                                 const float* q, int heads, float* out) = 0;
  /// Bytes of keys and values one token occupies over all layers.
  virtual double bytes_per_token() const = 0;
};

/// Per-block absmax integer formats of K and V (blocks of 32 along the head dimension, one
/// float16 scale each), as llama.cpp's q4_0 (4.5 bits per coordinate) and q8_0 (8.5): the
/// baselines a compressed cache is compared with. none: float32.
enum class BlockFormat { none, q4_0, q8_0 };

/// Rounds x (n values, n a multiple of 32) through `format` in place: q4_0 d = m / −8 where m is
/// the block's value of largest magnitude, q = clamp(round(x / d) + 8, 0, 15), x' = (q − 8)·d;
/// q8_0 d = max|x| / 127, q = round(x / d), x' = q·d; d rounded to float16 in both.
void round_trip_blocks(BlockFormat format, float* x, size_t n);
/// Bytes of n coordinates (n a multiple of 32) in `format`.
double block_bytes(BlockFormat format, size_t n);

/// The distortion-rate bound for Gaussian coordinates, as a KV store's rounding: what no
/// quantizer of a vector's rotated coordinates at `bits` bits a coordinate could beat on Gaussian
/// data (Shannon: a mean squared error of 4^−bits of the variance), simulated by the optimal
/// test channel. Each appended vector x (less its per-channel offset μ where `center`: the mean
/// of its layer's first batch, as the centering codecs take it), x = r·u with ‖u‖ = 1, becomes
/// r·((1 − δ)·u + √(δ·(1 − δ) / d)·g) (+ μ), with δ = 4^−bits and g fresh standard normal
/// draws, so that E‖u − û‖² = δ. The norm r is kept, and counted as a float16, as TurboQuant's.
/// A reference for what the bit budget alone costs, not a codec: nothing is stored in `bits`.
struct GaussianBound {
  double bits = 0;  ///< > 0: the bound replaces the block format
  bool center = false;
  uint64_t seed = 1;
};

/// Keys and values in float32 (the reference), or rounded through a block format or the bound.
class DenseKvStore : public KvStore {
 public:
  DenseKvStore(int layers, int kv_heads, int head_dim, BlockFormat format = BlockFormat::none);
  DenseKvStore(int layers, int kv_heads, int head_dim, const GaussianBound& bound);
  size_t length(int layer) const override;
  void append_and_attend(int layer, size_t tokens, const float* k, const float* v, const float* q,
                         int heads, float* out) override;
  double bytes_per_token() const override;
  /// The keys (after rotary embedding) and values stored at `layer`, as the model appended them
  /// (rounded through the block format, if any): [tokens][kv_heads][head_dim].
  std::span<const float> keys(int layer) const { return k_.at(size_t(layer)); }
  std::span<const float> values(int layer) const { return v_.at(size_t(layer)); }

 private:
  void apply_bound(int layer, int side, float* x, size_t tokens);

  int kv_heads_, head_dim_;
  BlockFormat format_;
  GaussianBound bound_;
  std::mt19937_64 rng_;
  std::vector<std::vector<float>> k_, v_;  // per layer: [token][kv_head][d]
  std::vector<std::vector<float>> offsets_[2];  // bound_.center: per side and layer, [kv_head][d]
};

/// Keys and values in a tqkv KVCache (one sequence), attention from the codes (attend()).
class CompressedKvStore : public KvStore {
 public:
  /// config's layers, kv_heads and head_dim must match the model; its pool must hold `tokens`.
  explicit CompressedKvStore(const CacheConfig& config);
  size_t length(int layer) const override;
  void append_and_attend(int layer, size_t tokens, const float* k, const float* v, const float* q,
                         int heads, float* out) override;
  double bytes_per_token() const override;
  const KVCache& cache() const { return cache_; }

 private:
  KVCache cache_;
  SequenceId seq_;
};

struct LlamaOptions {
  int head_dim = 64;  // not stored in the weights
  /// Quantize every projection's input on the fly as the exported graph does (matches
  /// onnxruntime). Off: float32 activations against the int8 weights. The rounding of uint8
  /// activations is discontinuous, so any small change upstream (a compressed cache's) re-rounds
  /// many of them; off, what a cache costs is measured without that floor.
  bool quantize_activations = true;
};

/// softmax(logits) in float64: a next-token distribution.
std::vector<double> probabilities(std::span<const float> logits);

class Llama {
 public:
  /// Reads the weights from a parsed ONNX model (checking every shape against the others).
  /// Throws tqkv::Error naming what does not fit.
  explicit Llama(const onnx::Model& model, const LlamaOptions& options = {});
  const LlamaConfig& config() const { return config_; }

  /// Runs the next `tokens` of the sequence whose cache is `kv` (positions kv.length(0) …) as
  /// one call (their projections' inputs quantized together), appending their keys and values.
  /// Returns logits [tokens, vocab], or only the last token's [vocab] if last_only.
  std::vector<float> forward(std::span<const int32_t> tokens, KvStore& kv,
                             bool last_only = false) const;

  /// A sequence of `tokens` tokens sampled from the model at temperature 1 with a float32 cache,
  /// starting from token 1 (<|im_start|>), one token at a time; `progress` (if set) is told the
  /// length every 64 tokens.
  std::vector<int32_t> sample(size_t tokens, std::mt19937_64& rng,
                              const std::function<void(size_t)>& progress = {}) const;

 private:
  struct Layer {
    std::vector<float> input_norm, post_norm;
    QuantizedLinear q, k, v, o, gate, up, down;
  };
  LlamaConfig config_;
  bool quantize_activations_ = true;
  std::vector<uint8_t> embed_q_;  // [vocab][hidden]
  float embed_scale_ = 0.0f;
  int embed_zero_point_ = 0;
  std::vector<Layer> layers_;
  std::vector<float> final_norm_;
  QuantizedLinear lm_head_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
};

}  // namespace tqkv
