// tqkv eval model: what each KV cache configuration costs a real model's predictions; and the
// demo's real-model section (tqkv demo --model).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kv_stats.hpp"
#include "plot.hpp"
#include "tqkv/error.hpp"
#include "tqkv/llama.hpp"
#include "tqkv/onnx.hpp"

namespace tqkv::cli {

namespace {

// A configuration by name: "full", "k<bits>[p]v<bits>[p][-dense][-center]" (p: prod codec;
// -center: centering codecs on both sides), "q4_0", "q8_0", "bound<bits>[-center]" (the
// distortion-rate bound for Gaussian coordinates, GaussianBound: a reference, not a codec).
struct CacheChoice {
  std::string name;
  BlockFormat block = BlockFormat::none;
  GaussianBound bound;
  bool compressed = false;
  CodecSpec key, value;
};

constexpr const char* kConfigForms =
    "full, q4_0, q8_0, bound<bits>[-center] or k<bits>[p]v<bits>[p][-dense][-center] (e.g. "
    "k3.5v3.5, k3pv4, k4v4-dense, k4v4-center, bound3.5)";

CacheChoice parse_choice(const std::string& name, int head_dim) {
  CacheChoice c;
  c.name = name;
  if (name == "full") return c;
  if (name == "q4_0" || name == "q8_0") {
    c.block = name == "q4_0" ? BlockFormat::q4_0 : BlockFormat::q8_0;
    TQKV_CHECK(head_dim % 32 == 0, "--configs: ", name, " needs head_dim a multiple of 32");
    return c;
  }
  std::string rest = name;
  auto strip = [&](const std::string& suffix) {
    const bool has = rest.size() > suffix.size() &&
                     rest.compare(rest.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (has) rest.resize(rest.size() - suffix.size());
    return has;
  };
  const bool center = strip("-center");
  if (rest.rfind("bound", 0) == 0) {
    const std::string bits = rest.substr(5);
    TQKV_CHECK(!bits.empty(), "--configs: '", name, "' is not ", kConfigForms);
    c.bound.bits = parse_bits(bits, "--configs '" + name + "'");
    TQKV_CHECK(c.bound.bits > 0 && c.bound.bits <= 16, "--configs '", name,
               "': the bound's bits must be in (0, 16]");
    c.bound.center = center;
    return c;
  }
  const RotationChoice rotation = strip("-dense") ? RotationChoice::dense
                                                  : RotationChoice::automatic;
  const size_t v = rest.find('v');
  TQKV_CHECK(rest.size() > 1 && rest[0] == 'k' && v != std::string::npos && v > 1,
             "--configs: '", name, "' is not ", kConfigForms);
  auto side = [&](std::string text, CodecSpec& spec, bool value) {
    spec.kind = CodecKind::mse;
    if (!text.empty() && text.back() == 'p') {
      spec.kind = CodecKind::prod;
      text.pop_back();
    }
    spec.bits = parse_bits(text, "--configs '" + name + "'");
    spec.dim = head_dim;
    spec.rotation = rotation;
    spec.seed = value ? 2 : 1;
    spec.center = center;
    check_cache_codec(spec, value, head_dim, "--configs '" + name + "'");
  };
  side(rest.substr(1, v - 1), c.key, false);
  side(rest.substr(v + 1), c.value, true);
  c.compressed = true;
  return c;
}

std::unique_ptr<KvStore> make_store(const CacheChoice& c, const LlamaConfig& m, size_t tokens) {
  if (c.bound.bits > 0)
    return std::make_unique<DenseKvStore>(m.layers, m.kv_heads, m.head_dim, c.bound);
  if (!c.compressed)
    return std::make_unique<DenseKvStore>(m.layers, m.kv_heads, m.head_dim, c.block);
  CacheConfig cc;
  cc.layers = m.layers;
  cc.kv_heads = m.kv_heads;
  cc.head_dim = m.head_dim;
  cc.key = c.key;
  cc.value = c.value;
  cc.page_tokens = 64;
  cc.max_pages = (tokens + 63) / 64;
  return std::make_unique<CompressedKvStore>(cc);
}

struct Totals {
  double bytes_per_token = 0;
  double kl = 0, nll = 0, nll_full = 0;
  size_t agree = 0, positions = 0;
};

// Adds what each position's next-token distribution under `got` costs against `full` (logits
// [seq.size(), V] both; position i predicts token i + 1, the last predicts nothing).
void add_comparison(const std::vector<float>& full, const std::vector<float>& got,
                    std::span<const int32_t> seq, size_t V, Totals& t) {
  double kl_sum = 0, nll = 0, nll_full = 0;
  size_t agree = 0;
  const size_t positions = seq.size() - 1;
#pragma omp parallel for reduction(+ : kl_sum, nll, nll_full, agree) schedule(static) \
    num_threads(num_threads())
  for (size_t i = 0; i < positions; ++i) {
    const auto p = probabilities(std::span(full.data() + i * V, V));
    const auto q = probabilities(std::span(got.data() + i * V, V));
    for (size_t j = 0; j < V; ++j)
      if (p[j] > 0) kl_sum += p[j] * (std::log(p[j]) - std::log(std::max(q[j], 1e-300)));
    const auto top = [](const std::vector<double>& x) {
      return std::max_element(x.begin(), x.end()) - x.begin();
    };
    agree += top(p) == top(q);
    const size_t next = size_t(seq[i + 1]);
    nll -= std::log(std::max(q[next], 1e-300));
    nll_full -= std::log(std::max(p[next], 1e-300));
  }
  t.kl += kl_sum;
  t.nll += nll;
  t.nll_full += nll_full;
  t.agree += agree;
  t.positions += positions;
}

// Mean KL (log) and top-1 agreement against bits per coordinate: TurboQuant configurations, the
// centering ones, the block baselines and the bound as four series (the full cache, at 0 KL, is
// not drawn).
void plot_rows(const nlohmann::json& rows, const std::vector<CacheChoice>& choices,
               const EvalModelArgs& args, const LlamaConfig& mc, const std::string& path) {
  PlotPanel kl{"mean KL(full || config), next-token distributions", true,
               {{"TurboQuant", {}}, {"block absmax (q4_0, q8_0)", {}},
                {"TurboQuant, centered", {}}, {"distortion-rate bound (Gaussian)", {}}}};
  PlotPanel top1{"top-1 agreement with the full cache", false, kl.series};
  for (size_t c = 0; c < choices.size(); ++c) {
    const CacheChoice& ch = choices[c];
    if (!ch.compressed && ch.block == BlockFormat::none && ch.bound.bits == 0) continue;
    const size_t s = ch.bound.bits > 0 ? 3 : !ch.compressed ? 1 : ch.key.center ? 2 : 0;
    const double bits = rows[c]["bits_per_coordinate"].get<double>();
    kl.series[s].points.push_back({bits, rows[c]["kl_mean"].get<double>(), choices[c].name});
    top1.series[s].points.push_back({bits, rows[c]["top1_agree"].get<double>(), choices[c].name});
  }
  for (size_t s = kl.series.size(); s-- > 0;)  // a series with no configuration is not drawn
    if (kl.series[s].points.empty()) {
      kl.series.erase(kl.series.begin() + long(s));
      top1.series.erase(top1.series.begin() + long(s));
    }
  write_plot(path,
             "KV cache configurations on " + std::to_string(mc.layers) + "-layer Llama, " +
                 std::to_string(args.sequences) + " x " + std::to_string(args.tokens) +
                 " sampled tokens",
             "bits per coordinate (codes, norms and scales)", {kl, top1});
}

// --kv-stats: the sequences through the float32 cache, their keys and values per layer
// gathered, one row per layer, KV head and kind.
int print_kv_stats(const Llama& model, const std::vector<std::vector<int32_t>>& seqs,
                   const EvalModelArgs& args, std::ostream& out) {
  const LlamaConfig& mc = model.config();
  constexpr int kSeeds = 32;
  std::vector<std::vector<float>> keys(size_t(mc.layers)), values(size_t(mc.layers));
  for (const auto& seq : seqs) {
    DenseKvStore store(mc.layers, mc.kv_heads, mc.head_dim);
    model.forward(seq, store);
    for (int l = 0; l < mc.layers; ++l) {
      keys[size_t(l)].insert(keys[size_t(l)].end(), store.keys(l).begin(), store.keys(l).end());
      values[size_t(l)].insert(values[size_t(l)].end(), store.values(l).begin(),
                               store.values(l).end());
    }
  }
  const auto rows = kv_stats(keys, values, mc.kv_heads, mc.head_dim, args.kv_bits, kSeeds);
  if (args.json) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& r : rows)
      arr.push_back({{"layer", r.layer}, {"kv_head", r.head}, {"kind", r.keys ? "key" : "value"},
                     {"vectors", r.vectors}, {"norm_mean", r.norms.mean},
                     {"norm_min", r.norms.min}, {"norm_max", r.norms.max},
                     {"channel_mean_abs", r.channels.mean_abs},
                     {"outlier_channels", r.channels.outliers},
                     {"max_channel_ratio", r.channels.max_ratio}, {"bits", args.kv_bits},
                     {"mse_theory", r.theory}, {"mse_hadamard", r.hadamard.mean},
                     {"mse_hadamard_stderr", r.hadamard.std_error}, {"mse_dense", r.dense.mean},
                     {"mse_dense_stderr", r.dense.std_error},
                     {"mse_unrotated", r.unrotated.mean},
                     {"mse_unrotated_stderr", r.unrotated.std_error}});
    out << arr.dump(2) << "\n";
    return 0;
  }
  out << "tqkv eval model --kv-stats: " << args.model << ", keys (after rotary embedding) and "
      << "values of " << seqs.size() << " sequences of " << args.tokens << " sampled tokens\n"
      << "norms: of the vectors; outliers: channels whose mean |x| is at least " << kOutlierRatio
      << "x the median channel's (max: the largest ratio);\n"
      << "distortion: mean |u - u_hat|^2 of the unit vectors u = x/|x| at " << args.kv_bits
      << " bits, mean over " << kSeeds << " rotation seeds (+- standard error); random data: "
      << fmt("%.5f", rows.front().theory) << "\n"
      << "kind  layer head   norm mean    min      max    max ratio  outliers            "
         "Hadamard          dense             no rotation\n";
  for (const auto& r : rows) {
    std::string outliers;
    for (int c : r.channels.outliers) {
      if (!outliers.empty()) outliers += ',';
      outliers += std::to_string(c);
    }
    if (outliers.empty()) outliers = "-";
    char line[320];
    std::snprintf(line, sizeof line,
                  "%-5s %5d %4d %10.3f %8.3f %8.3f %9.1f  %-18s %.5f+-%.5f  %.5f+-%.5f  "
                  "%.5f+-%.5f\n",
                  r.keys ? "key" : "value", r.layer, r.head, r.norms.mean, r.norms.min,
                  r.norms.max, r.channels.max_ratio, outliers.c_str(), r.hadamard.mean,
                  r.hadamard.std_error, r.dense.mean, r.dense.std_error, r.unrotated.mean,
                  r.unrotated.std_error);
    out << line;
  }
  return 0;
}

}  // namespace

int eval_model(const EvalModelArgs& args, std::ostream& out, std::ostream& err) {
  TQKV_CHECK(!args.model.empty(), "--model: an ONNX file is needed (tools/fetch-model.sh)");
  TQKV_CHECK(args.tokens >= 2, "--tokens must be at least 2, got ", args.tokens);
  TQKV_CHECK(args.sequences >= 1, "--sequences must be at least 1");
  TQKV_CHECK(!args.kv_stats || args.plot.empty(), "--plot draws the configurations, which "
             "--kv-stats does not run");
  if (!args.plot.empty()) check_plot_path(args.plot);
  const onnx::Model file = onnx::read(args.model);
  LlamaOptions options;
  options.quantize_activations = args.quantized_activations;
  const Llama model(file, options);
  const LlamaConfig& mc = model.config();
  TQKV_CHECK(args.kv_bits >= 1 && args.kv_bits <= 8, "--kv-bits must be in 1..8, got ",
             args.kv_bits);
  std::vector<CacheChoice> choices;
  for (const std::string& name : split_list(args.configs, "--configs"))
    choices.push_back(parse_choice(name, mc.head_dim));
  TQKV_CHECK(args.plot.empty() || std::any_of(choices.begin(), choices.end(),
                                              [](const CacheChoice& c) { return c.name != "full"; }),
             "--plot: --configs has nothing to draw but the full cache");

  // Sequences from the model itself, with the full cache.
  std::mt19937_64 rng(args.seed);
  std::vector<std::vector<int32_t>> seqs;
  for (size_t s = 0; s < args.sequences; ++s)
    seqs.push_back(model.sample(args.tokens, rng, [&](size_t n) {
      err << "\rsampling sequence " << s + 1 << "/" << args.sequences << ": " << n << "/"
          << args.tokens << " tokens" << std::flush;
    }));
  err << "\n";
  if (args.kv_stats) return print_kv_stats(model, seqs, args, out);

  // Each sequence through the full cache once, then through every configuration (one call per
  // sequence: its codes are those of token-by-token appends, and with float activations so are
  // its outputs up to summation order).
  const size_t V = size_t(mc.vocab);
  std::vector<Totals> totals(choices.size());
  double full_bytes = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto& seq = seqs[s];
    DenseKvStore full_store(mc.layers, mc.kv_heads, mc.head_dim);
    full_bytes = full_store.bytes_per_token();
    const std::vector<float> full = model.forward(seq, full_store);
    for (size_t c = 0; c < choices.size(); ++c) {
      err << "\rsequence " << s + 1 << "/" << seqs.size() << ": " << choices[c].name
          << std::string(12, ' ') << std::flush;
      auto store = make_store(choices[c], mc, seq.size());
      const std::vector<float> got = model.forward(seq, *store);
      totals[c].bytes_per_token = store->bytes_per_token();
      add_comparison(full, got, seq, V, totals[c]);
    }
  }
  err << "\n";

  nlohmann::json rows = nlohmann::json::array();
  const double coords = double(mc.layers) * 2.0 * mc.kv_heads * mc.head_dim;
  for (size_t c = 0; c < choices.size(); ++c) {
    const CacheChoice& ch = choices[c];
    const Totals& t = totals[c];
    const double bytes = t.bytes_per_token;
    const double n = double(t.positions);
    nlohmann::json r;
    r["config"] = ch.name;
    const double plain_bits = ch.bound.bits > 0 ? ch.bound.bits : bytes * 8.0 / coords;
    r["key_bits"] = ch.compressed ? ch.key.bits : plain_bits;
    r["value_bits"] = ch.compressed ? ch.value.bits : plain_bits;
    r["bits_per_coordinate"] = bytes * 8.0 / coords;
    r["bytes_per_token"] = bytes;
    r["tokens"] = size_t(n);
    r["kl_mean"] = t.kl / n;
    r["top1_agree"] = double(t.agree) / n;
    r["ppl"] = std::exp(t.nll / n);
    r["ppl_full"] = std::exp(t.nll_full / n);
    rows.push_back(r);
  }
  if (!args.plot.empty()) plot_rows(rows, choices, args, mc, args.plot);
  if (args.json) {
    out << rows.dump(2) << "\n";
    return 0;
  }
  out << "tqkv eval model: " << args.model << " (" << mc.layers << " layers, " << mc.heads
      << " heads, " << mc.kv_heads << " KV heads, d " << mc.head_dim << "), "
      << args.sequences << " sequences of " << args.tokens << " tokens sampled at temperature 1 "
      << "(seed " << args.seed << "), activations "
      << (args.quantized_activations ? "uint8 as exported" : "float32") << "\n"
      << "full cache: " << fmt("%.0f", full_bytes) << " bytes of KV per token\n";
  out << "config          bits/coord  bytes/token   mean KL     top-1      ppl  ppl full\n";
  for (const auto& r : rows) {
    const std::string name = r["config"].get<std::string>();
    out << name << std::string(name.size() < 16 ? 16 - name.size() : 1, ' ')
        << fmt("%10.3f", r["bits_per_coordinate"].get<double>())
        << fmt("%13.0f", r["bytes_per_token"].get<double>())
        << fmt("%12.3e", r["kl_mean"].get<double>())
        << fmt("%9.4f", r["top1_agree"].get<double>()) << fmt("%9.3f", r["ppl"].get<double>())
        << fmt("%10.3f", r["ppl_full"].get<double>()) << "\n";
  }
  return 0;
}

int demo_model(const std::string& path, size_t tokens, uint64_t seed, std::ostream& out,
               std::ostream& err) {
  TQKV_CHECK(!path.empty(), "--model: an ONNX file is needed (tools/fetch-model.sh)");
  constexpr size_t kDecode = 16;  // the last tokens run one at a time, as in generation
  TQKV_CHECK(tokens > kDecode, "--tokens must be more than ", kDecode, ", got ", tokens);
  const onnx::Model file = onnx::read(path);
  const Llama model(file, LlamaOptions{.quantize_activations = false});
  const LlamaConfig& mc = model.config();
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> seq = model.sample(tokens, rng, [&](size_t n) {
    err << "\rsampling: " << n << "/" << tokens << " tokens" << std::flush;
  });
  err << "\n";
  const double fp16_bytes = double(mc.layers) * 2 * mc.kv_heads * mc.head_dim * 2;
  out << "tqkv demo on a real model: " << path << "\n(" << mc.layers << " layers, " << mc.heads
      << " query heads on " << mc.kv_heads << " KV heads, head dim " << mc.head_dim
      << ", vocabulary " << mc.vocab << "), " << num_threads() << " threads\n"
      << "One sequence of " << tokens << " tokens sampled from the model (temperature 1, seed "
      << seed << "),\nrun through each KV cache: the first " << tokens - kDecode
      << " as one prefill call, the last " << kDecode << " one at a time (decode).\n"
      << "cache            KV bytes/token  vs fp16  mean KL    top-1     ppl   prefill tok/s"
         "  decode ms/token\n";
  const size_t V = size_t(mc.vocab), prefill = tokens - kDecode;
  std::vector<float> full;
  for (const char* name : {"full", "k4v4", "k3.5v3.5", "k3v3", "k2v2", "k4v4-center",
                           "k3.5v3.5-center", "q4_0", "q8_0"}) {
    const CacheChoice choice = parse_choice(name, mc.head_dim);
    auto store = make_store(choice, mc, tokens);
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    std::vector<float> logits = model.forward(std::span(seq).first(prefill), *store);
    const auto t1 = clock::now();
    for (size_t i = prefill; i < tokens; ++i) {
      const std::vector<float> next = model.forward(std::span(seq).subspan(i, 1), *store);
      logits.insert(logits.end(), next.begin(), next.end());
    }
    const auto t2 = clock::now();
    if (full.empty()) full = logits;
    Totals t;
    add_comparison(full, logits, seq, V, t);
    const double n = double(t.positions);
    const std::string label = choice.name == "full" ? "full (f32)" : choice.name;
    out << label << std::string(label.size() < 17 ? 17 - label.size() : 1, ' ')
        << fmt("%14.0f", store->bytes_per_token())
        << fmt("%8.2fx", fp16_bytes / store->bytes_per_token()) << fmt("%10.2e", t.kl / n)
        << fmt("%8.3f", double(t.agree) / n) << fmt("%8.2f", std::exp(t.nll / n))
        << fmt("%16.0f", double(prefill) / std::chrono::duration<double>(t1 - t0).count())
        << fmt("%17.2f", 1e3 * std::chrono::duration<double>(t2 - t1).count() / kDecode)
        << "\n" << std::flush;
  }
  out << "vs fp16: a float16 cache's bytes per token over this cache's. mean KL, top-1 and ppl:\n"
         "the next-token distributions against the full float32 cache's, over "
      << tokens - 1 << " positions.\n"
         "At this size the model's projections take most of the time; the attention section\n"
         "of `tqkv demo` (without --model) times attention alone.\n";
  return 0;
}

}  // namespace tqkv::cli
