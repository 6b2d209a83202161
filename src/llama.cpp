// The Llama forward pass (llama.hpp), following the int8 dynamic-quantization ONNX graph.
#include "tqkv/llama.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "cpu/kernels.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "tqkv/onnx.hpp"

namespace tqkv {

namespace {

// DynamicQuantizeLinear (ONNX): uint8, one scale and zero point for the whole tensor, the range
// stretched to include 0, rounding half to even.
struct Quantized {
  std::vector<int32_t> a;  // q − zero point, [rows][in]
  float scale = 0.0f;
};
Quantized quantize_dynamic(const float* x, size_t n) {
  float lo = 0.0f, hi = 0.0f;
  for (size_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  Quantized out;
  out.a.assign(n, 0);
  out.scale = (hi - lo) / 255.0f;
  if (out.scale == 0.0f) return out;  // all zeros
  const float zp = std::clamp(std::nearbyint(0.0f - lo / out.scale), 0.0f, 255.0f);
  for (size_t i = 0; i < n; ++i) {
    const float q = std::clamp(std::nearbyint(x[i] / out.scale) + zp, 0.0f, 255.0f);
    out.a[i] = int32_t(q) - int32_t(zp);
  }
  return out;
}

void rms_norm(const float* x, size_t rows, int n, const std::vector<float>& w, double eps,
              float* y) {
  for (size_t r = 0; r < rows; ++r) {
    const float* xr = x + r * size_t(n);
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += double(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(float(ss / n) + float(eps));
    for (int i = 0; i < n; ++i) y[r * size_t(n) + size_t(i)] = w[size_t(i)] * (xr[i] * inv);
  }
}

// Rotate-half rotary embedding of `heads` heads per row, rows at positions pos0, pos0 + 1, …
void rope(float* x, size_t rows, int heads, int d, size_t pos0, const std::vector<float>& inv) {
  const int half = d / 2;
  for (size_t r = 0; r < rows; ++r) {
    const float pos = float(pos0 + r);
    for (int j = 0; j < half; ++j) {
      const float angle = inv[size_t(j)] * pos;
      const float c = std::cos(angle), s = std::sin(angle);
      for (int h = 0; h < heads; ++h) {
        float* v = x + (r * size_t(heads) + size_t(h)) * size_t(d);
        const float a = v[j], b = v[j + half];
        v[j] = a * c - b * s;
        v[j + half] = b * c + a * s;
      }
    }
  }
}

QuantizedLinear load_linear(const onnx::Model& m, const onnx::Node& node, int in, int out) {
  TQKV_CHECK(node.inputs.size() == 4, "model ", m.name, ": node ", node.name, " has ",
             node.inputs.size(), " inputs (MatMulInteger takes 4)");
  const std::string& weight = node.inputs[1];
  const std::string suffix = "_quantized";
  TQKV_CHECK(weight.size() > suffix.size() &&
                 weight.compare(weight.size() - suffix.size(), suffix.size(), suffix) == 0,
             "model ", m.name, ": weight '", weight, "' of ", node.name, " is not '*_quantized'");
  const std::string stem = weight.substr(0, weight.size() - suffix.size());
  const onnx::Tensor& w = m.at(weight);
  TQKV_CHECK(w.type == onnx::DataType::int8 && w.dims.size() == 2 && w.dims[0] == in &&
                 w.dims[1] == out && w.raw.size() == size_t(in) * size_t(out),
             "model ", m.name, ": weight of ", node.name, " is ", onnx::to_string(w.type), " [",
             w.dims.size() > 0 ? w.dims[0] : 0, ", ", w.dims.size() > 1 ? w.dims[1] : 0,
             "], expected int8 [", in, ", ", out, "]");
  QuantizedLinear l;
  l.in = in;
  l.out = out;
  l.q.resize(w.raw.size());
  std::memcpy(l.q.data(), w.raw.data(), w.raw.size());
  l.scale = float(m.at(stem + "_scale").scalar());
  l.zero_point = int(m.at(stem + "_zero_point").scalar());
  TQKV_CHECK(std::isfinite(l.scale) && l.scale > 0.0f, "model ", m.name, ": scale of ", node.name,
             " is ", l.scale);
  return l;
}

std::vector<float> load_norm(const onnx::Model& m, const std::string& name, int n) {
  const onnx::Tensor& t = m.at(name);
  TQKV_CHECK(t.elements() == size_t(n), "model ", m.name, ": ", name, " has ", t.elements(),
             " elements, expected ", n);
  return t.to_floats();
}

}  // namespace

void QuantizedLinear::apply(const float* x, size_t rows, float* y, bool quantize_input) const {
  // Work items: (block of rows, block of output columns), so one row (decode) still uses every
  // thread and a block of weights is reused by many rows while it is in cache.
  constexpr size_t kBlock = 512;
  const size_t O = size_t(out), blocks = (O + kBlock - 1) / kBlock;
  if (!quantize_input) {
    constexpr size_t kRows = 64;
    const size_t row_blocks = (rows + kRows - 1) / kRows;
    const cpu::FloatKernels& kernels = cpu::float_kernels();
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
    for (size_t rb = 0; rb < row_blocks; ++rb) {
      for (size_t b = 0; b < blocks; ++b) {
        const size_t r0 = rb * kRows, m = std::min(kRows, rows - r0);
        const size_t j0 = b * kBlock, n = std::min(kBlock, O - j0);
        float* yb = y + r0 * O + j0;
        kernels.int8_matmul(x + r0 * size_t(in), int(m), in, q.data() + j0, O, int(n), yb, O);
        for (size_t r = 0; r < m; ++r) {
          const float* xr = x + (r0 + r) * size_t(in);
          double sum_x = 0.0;
          for (int i = 0; i < in; ++i) sum_x += xr[i];
          const float bias = float(double(zero_point) * sum_x);
          for (size_t j = 0; j < n; ++j) yb[r * O + j] = (yb[r * O + j] - bias) * scale;
        }
      }
    }
    return;
  }
  const Quantized xq = quantize_dynamic(x, rows * size_t(in));
  const float s = xq.scale * scale;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
  for (size_t r = 0; r < rows; ++r) {
    for (size_t b = 0; b < blocks; ++b) {
      const size_t j0 = b * kBlock, n = std::min(kBlock, O - j0);
      int32_t acc[kBlock] = {};
      const int32_t* a = xq.a.data() + r * size_t(in);
      int64_t sum_a = 0;
      for (int i = 0; i < in; ++i) {
        const int32_t ai = a[i];
        sum_a += ai;
        if (ai == 0) continue;
        const int8_t* w = q.data() + size_t(i) * O + j0;
        for (size_t j = 0; j < n; ++j) acc[j] += ai * int32_t(w[j]);
      }
      const int64_t bias = int64_t(zero_point) * sum_a;
      for (size_t j = 0; j < n; ++j)
        y[r * O + j0 + j] = float(int32_t(int64_t(acc[j]) - bias)) * s;
    }
  }
}

// --- KV stores ----------------------------------------------------------------------------------

void round_trip_blocks(BlockFormat format, float* x, size_t n) {
  if (format == BlockFormat::none) return;
  TQKV_CHECK(n % 32 == 0, "block formats need a multiple of 32 values, got ", n);
  for (size_t b = 0; b < n; b += 32) {
    float* v = x + b;
    float m = 0.0f;  // the value of largest magnitude (q4_0 keeps its sign)
    for (int i = 0; i < 32; ++i)
      if (std::abs(v[i]) > std::abs(m)) m = v[i];
    const float d = half_to_float(float_to_half(format == BlockFormat::q4_0 ? m / -8.0f
                                                                            : std::abs(m) / 127.0f));
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < 32; ++i) {
      if (format == BlockFormat::q4_0) {
        const float q = std::clamp(std::nearbyint(v[i] * inv) + 8.0f, 0.0f, 15.0f);
        v[i] = (q - 8.0f) * d;
      } else {
        v[i] = std::nearbyint(v[i] * inv) * d;
      }
    }
  }
}

double block_bytes(BlockFormat format, size_t n) {
  switch (format) {
    case BlockFormat::q4_0: return double(n) / 32.0 * 18.0;
    case BlockFormat::q8_0: return double(n) / 32.0 * 34.0;
    default: return double(n) * 4.0;
  }
}

DenseKvStore::DenseKvStore(int layers, int kv_heads, int head_dim, BlockFormat format)
    : kv_heads_(kv_heads), head_dim_(head_dim), format_(format), k_(size_t(layers)),
      v_(size_t(layers)) {
  TQKV_CHECK(layers > 0 && kv_heads > 0 && head_dim > 0, "DenseKvStore: bad shape");
  TQKV_CHECK(format == BlockFormat::none || head_dim % 32 == 0,
             "DenseKvStore: block formats need head_dim a multiple of 32, got ", head_dim);
}

DenseKvStore::DenseKvStore(int layers, int kv_heads, int head_dim, const GaussianBound& bound)
    : DenseKvStore(layers, kv_heads, head_dim) {
  TQKV_CHECK(std::isfinite(bound.bits) && bound.bits > 0 && bound.bits <= 16,
             "DenseKvStore: the bound's bits must be in (0, 16], got ", bound.bits);
  bound_ = bound;
  rng_.seed(bound.seed);
  for (auto& side : offsets_) side.resize(size_t(layers));
}

void DenseKvStore::apply_bound(int layer, int side, float* x, size_t tokens) {
  const size_t d = size_t(head_dim_), row = size_t(kv_heads_) * d;
  std::vector<float>& mu = offsets_[side].at(size_t(layer));
  if (bound_.center && mu.empty()) {  // the first batch's per-channel mean
    std::vector<double> sum(row, 0.0);
    for (size_t t = 0; t < tokens; ++t)
      for (size_t j = 0; j < row; ++j) sum[j] += x[t * row + j];
    mu.resize(row);
    for (size_t j = 0; j < row; ++j) mu[j] = float(sum[j] / double(tokens));
  }
  const double delta = std::pow(4.0, -bound_.bits);
  const double keep = 1.0 - delta, spread = std::sqrt(delta * (1.0 - delta) / double(d));
  std::normal_distribution<double> g(0.0, 1.0);
  std::vector<double> u(d);
  for (size_t t = 0; t < tokens; ++t)
    for (size_t h = 0; h < size_t(kv_heads_); ++h) {
      float* v = x + t * row + h * d;
      const float* m = mu.empty() ? nullptr : mu.data() + h * d;
      double r2 = 0.0;
      for (size_t j = 0; j < d; ++j) {
        u[j] = double(v[j]) - (m ? m[j] : 0.0f);
        r2 += u[j] * u[j];
      }
      const double r = std::sqrt(r2), inv = r > 0 ? 1.0 / r : 0.0;
      for (size_t j = 0; j < d; ++j) {
        const double noisy = keep * u[j] * inv + spread * g(rng_);
        v[j] = float(r * noisy + (m ? m[j] : 0.0f));
      }
    }
}

size_t DenseKvStore::length(int layer) const {
  return k_.at(size_t(layer)).size() / (size_t(kv_heads_) * size_t(head_dim_));
}

void DenseKvStore::append_and_attend(int layer, size_t tokens, const float* k, const float* v,
                                     const float* q, int heads, float* out) {
  TQKV_CHECK(heads % kv_heads_ == 0, "DenseKvStore: ", heads, " heads for ", kv_heads_,
             " KV heads");
  auto& K = k_.at(size_t(layer));
  auto& V = v_.at(size_t(layer));
  const size_t row = size_t(kv_heads_) * size_t(head_dim_), d = size_t(head_dim_);
  K.insert(K.end(), k, k + tokens * row);
  V.insert(V.end(), v, v + tokens * row);
  round_trip_blocks(format_, K.data() + K.size() - tokens * row, tokens * row);
  round_trip_blocks(format_, V.data() + V.size() - tokens * row, tokens * row);
  if (bound_.bits > 0) {
    apply_bound(layer, 0, K.data() + K.size() - tokens * row, tokens);
    apply_bound(layer, 1, V.data() + V.size() - tokens * row, tokens);
  }
  const size_t T = K.size() / row, first = T - tokens;
  const int R = heads / kv_heads_;
  const float scale = 1.0f / std::sqrt(float(d));
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
  for (size_t i = 0; i < tokens; ++i) {
    for (int h = 0; h < heads; ++h) {
      const size_t pos = first + i, g = size_t(h / R);
      const float* qi = q + (i * size_t(heads) + size_t(h)) * d;
      std::vector<float> s(pos + 1);
      float mx = -INFINITY;
      for (size_t t = 0; t <= pos; ++t) {
        const float* kt = K.data() + t * row + g * d;
        float dot = 0.0f;
        for (size_t j = 0; j < d; ++j) dot += qi[j] * kt[j];
        s[t] = dot * scale;
        mx = std::max(mx, s[t]);
      }
      double sum = 0.0;
      for (float& x : s) sum += (x = std::exp(x - mx));
      float* o = out + (i * size_t(heads) + size_t(h)) * d;
      std::fill(o, o + d, 0.0f);
      for (size_t t = 0; t <= pos; ++t) {
        const float p = float(s[t] / sum);
        const float* vt = V.data() + t * row + g * d;
        for (size_t j = 0; j < d; ++j) o[j] += p * vt[j];
      }
    }
  }
}

double DenseKvStore::bytes_per_token() const {
  const size_t n = size_t(kv_heads_) * size_t(head_dim_);
  if (bound_.bits > 0)  // bits a coordinate and a float16 norm a vector
    return double(k_.size()) * 2.0 * (double(n) * bound_.bits / 8.0 + 2.0 * kv_heads_);
  return double(k_.size()) * 2.0 * block_bytes(format_, n);
}

CompressedKvStore::CompressedKvStore(const CacheConfig& config)
    : cache_(config), seq_(cache_.add_sequence()) {}

size_t CompressedKvStore::length(int layer) const { return cache_.length(seq_, layer); }

void CompressedKvStore::append_and_attend(int layer, size_t tokens, const float* k,
                                          const float* v, const float* q, int heads, float* out) {
  cache_.append(seq_, layer, k, v, tokens);
  const SequenceId seqs[] = {seq_};
  const size_t queries[] = {tokens};
  attend(cache_, layer, seqs, queries, q, heads, out);
}

double CompressedKvStore::bytes_per_token() const { return double(cache_.bytes_per_token()); }

// --- the model ------------------------------------------------------------------------------------

std::vector<double> probabilities(std::span<const float> logits) {
  double mx = -INFINITY, sum = 0.0;
  for (float x : logits) mx = std::max(mx, double(x));
  std::vector<double> p(logits.size());
  for (size_t i = 0; i < p.size(); ++i) sum += (p[i] = std::exp(double(logits[i]) - mx));
  for (double& x : p) x /= sum;
  return p;
}

Llama::Llama(const onnx::Model& m, const LlamaOptions& options)
    : quantize_activations_(options.quantize_activations) {
  const int head_dim = options.head_dim;
  const onnx::Tensor& embed = m.at("model.model.embed_tokens.weight_quantized");
  TQKV_CHECK(embed.type == onnx::DataType::uint8 && embed.dims.size() == 2,
             "model ", m.name, ": the token embedding is not uint8 [vocab, hidden]");
  config_.vocab = int(embed.dims[0]);
  config_.hidden = int(embed.dims[1]);
  embed_q_.assign(embed.raw.begin(), embed.raw.end());
  embed_scale_ = float(m.at("model.model.embed_tokens.weight_scale").scalar());
  embed_zero_point_ = int(m.at("model.model.embed_tokens.weight_zero_point").scalar());
  const int H = config_.hidden;
  TQKV_CHECK(head_dim > 0 && head_dim % 2 == 0 && H % head_dim == 0, "model ", m.name,
             ": head_dim ", head_dim, " does not divide hidden ", H);

  auto node = [&](const std::string& name) -> const onnx::Node& {
    for (const onnx::Node& n : m.nodes)
      if (n.name == name && n.op_type == "MatMulInteger") return n;
    throw Error(detail::concat("model ", m.name, ": no MatMulInteger node '", name, "'"));
  };
  auto width = [&](const std::string& name) {  // a projection's output width, read off its weight
    const onnx::Node& n = node(name);
    TQKV_CHECK(n.inputs.size() == 4, "model ", m.name, ": node ", name, " has ", n.inputs.size(),
               " inputs");
    const onnx::Tensor& w = m.at(n.inputs[1]);
    TQKV_CHECK(w.dims.size() == 2, "model ", m.name, ": weight of ", name, " is not a matrix");
    return int(w.dims[1]);
  };
  for (int l = 0;; ++l) {
    const std::string p = "/model/model/layers." + std::to_string(l) + "/";
    bool present = false;
    for (const onnx::Node& n : m.nodes) present |= n.name == p + "self_attn/q_proj/MatMul_quant";
    if (!present) break;
    const int kv = width(p + "self_attn/k_proj/MatMul_quant");
    const int ffn = width(p + "mlp/gate_proj/MatMul_quant");
    if (l == 0) {
      config_.heads = width(p + "self_attn/q_proj/MatMul_quant") / head_dim;
      config_.kv_heads = kv / head_dim;
      config_.ffn = ffn;
      config_.head_dim = head_dim;
    }
    const int Q = config_.heads * head_dim, KV = config_.kv_heads * head_dim;
    TQKV_CHECK(config_.kv_heads > 0 && config_.heads % config_.kv_heads == 0 && kv == KV &&
                   ffn == config_.ffn,
               "model ", m.name, ": layer ", l, " has q/k widths ", Q, "/", kv, " and MLP ", ffn,
               ", which do not make a GQA layer with head_dim ", head_dim);
    Layer L;
    const std::string w = "model.model.layers." + std::to_string(l) + ".";
    L.input_norm = load_norm(m, w + "input_layernorm.weight", H);
    L.post_norm = load_norm(m, w + "post_attention_layernorm.weight", H);
    L.q = load_linear(m, node(p + "self_attn/q_proj/MatMul_quant"), H, Q);
    L.k = load_linear(m, node(p + "self_attn/k_proj/MatMul_quant"), H, KV);
    L.v = load_linear(m, node(p + "self_attn/v_proj/MatMul_quant"), H, KV);
    L.o = load_linear(m, node(p + "self_attn/o_proj/MatMul_quant"), Q, H);
    L.gate = load_linear(m, node(p + "mlp/gate_proj/MatMul_quant"), H, ffn);
    L.up = load_linear(m, node(p + "mlp/up_proj/MatMul_quant"), H, ffn);
    L.down = load_linear(m, node(p + "mlp/down_proj/MatMul_quant"), ffn, H);
    layers_.push_back(std::move(L));
  }
  config_.layers = int(layers_.size());
  TQKV_CHECK(config_.layers > 0, "model ", m.name, ": no decoder layers found");
  final_norm_ = load_norm(m, "model.model.norm.weight", H);
  lm_head_ = load_linear(m, node("/model/lm_head/MatMul_quant"), H, config_.vocab);
  // Rotary frequencies as the export stored them ([1, head_dim / 2, 1] float32), else θ^(−2j/d).
  inv_freq_.resize(size_t(head_dim / 2));
  for (int j = 0; j < head_dim / 2; ++j)
    inv_freq_[size_t(j)] = float(std::pow(config_.rope_theta, -2.0 * j / head_dim));
  for (const onnx::Tensor& t : m.initializers)
    if (t.type == onnx::DataType::float32 && t.dims == std::vector<int64_t>{1, head_dim / 2, 1}) {
      const auto f = t.to_floats();
      for (int j = 0; j < head_dim / 2; ++j) inv_freq_[size_t(j)] = f[size_t(j)];
    }
}

std::vector<float> Llama::forward(std::span<const int32_t> tokens, KvStore& kv,
                                  bool last_only) const {
  const LlamaConfig& c = config_;
  const size_t T = tokens.size(), H = size_t(c.hidden), d = size_t(c.head_dim);
  TQKV_CHECK(T > 0, "Llama::forward: no tokens");
  for (int32_t t : tokens)
    TQKV_CHECK(t >= 0 && t < c.vocab, "Llama::forward: token ", t, " outside 0..", c.vocab - 1);
  const size_t pos0 = kv.length(0);
  std::vector<float> h(T * H), x(T * H);
  for (size_t i = 0; i < T; ++i)
    for (size_t j = 0; j < H; ++j)
      h[i * H + j] =
          (float(embed_q_[size_t(tokens[i]) * H + j]) - float(embed_zero_point_)) * embed_scale_;
  const size_t Q = size_t(c.heads) * d, KV = size_t(c.kv_heads) * d, F = size_t(c.ffn);
  std::vector<float> q(T * Q), k(T * KV), v(T * KV), att(T * Q), y(T * H), g(T * F), u(T * F);
  for (int l = 0; l < c.layers; ++l) {
    const Layer& L = layers_[size_t(l)];
    rms_norm(h.data(), T, c.hidden, L.input_norm, c.rms_eps, x.data());
    L.q.apply(x.data(), T, q.data(), quantize_activations_);
    L.k.apply(x.data(), T, k.data(), quantize_activations_);
    L.v.apply(x.data(), T, v.data(), quantize_activations_);
    rope(q.data(), T, c.heads, c.head_dim, pos0, inv_freq_);
    rope(k.data(), T, c.kv_heads, c.head_dim, pos0, inv_freq_);
    kv.append_and_attend(l, T, k.data(), v.data(), q.data(), c.heads, att.data());
    L.o.apply(att.data(), T, y.data(), quantize_activations_);
    for (size_t i = 0; i < T * H; ++i) h[i] += y[i];
    rms_norm(h.data(), T, c.hidden, L.post_norm, c.rms_eps, x.data());
    L.gate.apply(x.data(), T, g.data(), quantize_activations_);
    L.up.apply(x.data(), T, u.data(), quantize_activations_);
    for (size_t i = 0; i < T * F; ++i) g[i] = g[i] * (1.0f / (1.0f + std::exp(-g[i]))) * u[i];
    L.down.apply(g.data(), T, y.data(), quantize_activations_);
    for (size_t i = 0; i < T * H; ++i) h[i] += y[i];
  }
  rms_norm(h.data(), T, c.hidden, final_norm_, c.rms_eps, x.data());
  std::vector<float> logits(T * size_t(c.vocab));
  lm_head_.apply(x.data(), T, logits.data(), quantize_activations_);
  if (last_only) logits.erase(logits.begin(), logits.end() - c.vocab);
  return logits;
}

std::vector<int32_t> Llama::sample(size_t tokens, std::mt19937_64& rng,
                                   const std::function<void(size_t)>& progress) const {
  std::vector<int32_t> seq = {1};
  DenseKvStore kv(config_.layers, config_.kv_heads, config_.head_dim);
  std::vector<float> logits = forward(seq, kv, true);
  while (seq.size() < tokens) {
    const auto p = probabilities(logits);
    seq.push_back(int32_t(std::discrete_distribution<int32_t>(p.begin(), p.end())(rng)));
    logits = forward(std::span(&seq.back(), 1), kv, true);
    if (progress && seq.size() % 64 == 0) progress(seq.size());
  }
  return seq;
}

}  // namespace tqkv
