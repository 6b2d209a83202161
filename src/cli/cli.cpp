#include "cli.hpp"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#include "commands.hpp"
#include "eval.hpp"
#include "tqkv/device.hpp"
#include "tqkv/error.hpp"
#include "tqkv/file.hpp"
#include "tqkv/npy.hpp"

namespace tqkv::cli {

// ---- helpers shared with the other command files (commands.hpp) -----------------------------

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

double parse_bits(const std::string& text, std::string_view option) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TQKV_CHECK(used == text.size() && !text.empty() && std::isfinite(v), option, ": '", text,
             "' is not a number");
  return v;
}

std::vector<std::string> split_list(const std::string& text, std::string_view option) {
  std::vector<std::string> items;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) items.push_back(item);
  TQKV_CHECK(!items.empty(), option, ": empty list '", text, "'");
  return items;
}

std::string describe(const CodecSpec& s) {
  std::ostringstream o;
  o << s.bits << "-bit " << to_string(s.kind) << ", rotation " << to_string(s.rotation)
    << ", seed " << s.seed << ", norm " << to_string(s.norm_format);
  if (s.center) {
    double norm = 0;
    for (float x : s.offset) norm += double(x) * x;
    o << ", centered (offset norm " << std::sqrt(norm) << ")";
  }
  return o.str();
}

void check_cache_codec(const CodecSpec& spec, bool value, int head_dim, std::string_view option) {
  CacheConfig c;  // the other side keeps the default codec (4-bit mse), valid at any head_dim
  c.head_dim = head_dim;
  (value ? c.value : c.key) = spec;
  c.max_pages = 0;  // validates without allocating a pool
  try {
    KVCache probe(c);
  } catch (const Error& e) {
    throw Error(detail::concat(option, ": ", e.what()));
  }
}

namespace {

// Options shared by the commands that build a codec.
struct CodecOptions {
  std::string bits = "4", codec = "mse", rotation = "auto", norm = "f16";
  uint64_t seed = 0;
  bool center = false;

  void add_to(CLI::App* app, bool with_bits = true) {
    if (with_bits)
      app->add_option("--bits", bits, "bits per coordinate: 1..8 (mse) or 1..9 (prod), or "
                                      "fractional such as 2.5 / 3.5")
          ->required();
    app->add_option("--codec", codec, "mse (TurboQuant_mse) or prod (TurboQuant_prod)")
        ->capture_default_str();
    app->add_option("--rotation", rotation, "auto, hadamard (power-of-two dims) or dense")
        ->capture_default_str();
    app->add_option("--seed", seed, "seed of the rotation and QJL matrix")->capture_default_str();
    app->add_option("--norm", norm, "stored norm format: f16 or f32")->capture_default_str();
    app->add_flag("--center", center,
                  "encode each vector less the batch's per-channel mean (stored with the codec; "
                  "decoding adds it back): less error where vectors share a large component");
  }
  CodecSpec spec(int dim, const std::string& bits_text) const {
    CodecSpec s;
    s.dim = dim;
    s.bits = parse_bits(bits_text);
    s.kind = parse_codec_kind(codec);
    s.rotation = parse_rotation_choice(rotation);
    s.norm_format = parse_norm_format(norm);
    s.seed = seed;
    s.center = center;
    return s;
  }
};

// ---- quantize / dequantize / info ----------------------------------------------------------

int quantize(const std::string& in, const std::string& out_path, const CodecOptions& opt,
             std::ostream& out) {
  const auto arr = npy::read(in);
  TQKV_CHECK(arr.shape.size() == 2, in, ": expected a 2-D array [N, d], got ",
             arr.shape.size(), " dimensions");
  const size_t n = arr.rows();
  const int d = int(arr.cols());
  TQKV_CHECK(n > 0, in, ": the array has no rows");
  Codec codec(opt.spec(d, opt.bits));
  file::EncodedVectors ev;
  ev.count = n;
  ev.record_bytes = codec.record_bytes();
  ev.records.resize(n * ev.record_bytes);
  try {
    codec.encode(arr.data.data(), n, ev.records.data());
  } catch (const Error& e) {
    throw Error(in + ": " + e.what());
  }
  ev.spec = codec.spec();
  file::write_encoded(out_path, ev);
  out << "quantized " << n << " vectors of dim " << d << " (" << describe(ev.spec) << "): "
      << ev.record_bytes << " bytes per vector, " << fmt("%.2f", 2.0 * d / ev.record_bytes)
      << "x smaller than float16 -> " << out_path << "\n";
  return 0;
}

int dequantize(const std::string& in, const std::string& out_path, const std::string& dtype,
               std::ostream& out) {
  const auto ev = file::read_encoded(in);
  const Codec codec(ev.spec);
  std::vector<float> x(ev.count * size_t(ev.spec.dim));
  codec.decode(ev.records.data(), ev.count, x.data());
  TQKV_CHECK(dtype == "f32" || dtype == "f16", "--dtype: expected f32 or f16, got '", dtype, "'");
  const size_t shape[2] = {ev.count, size_t(ev.spec.dim)};
  npy::write(out_path, x, shape, dtype == "f16" ? npy::DType::f16 : npy::DType::f32);
  out << "dequantized " << ev.count << " vectors of dim " << ev.spec.dim << " -> " << out_path
      << "\n";
  return 0;
}

// A KV-cache file (kind 2, KVCache::save).
int info_cache(const std::string& in, std::span<const uint8_t> bytes, bool json,
               std::ostream& out) {
  const KVCache cache = KVCache::parse(bytes, in);
  const CacheConfig& c = cache.config();
  const size_t pages_used = cache.pages_total() - cache.pages_free();
  const double ratio = double(cache.fp16_bytes_per_token()) / double(cache.bytes_per_token());
  // Lengths per layer; a sequence whose layers all hold the same count prints one number.
  std::vector<std::pair<SequenceId, std::vector<size_t>>> seqs;
  for (const SequenceId id : cache.sequences()) {
    std::vector<size_t> lengths;
    for (int l = 0; l < c.layers; ++l) lengths.push_back(cache.length(id, l));
    seqs.emplace_back(id, std::move(lengths));
  }
  if (json) {
    nlohmann::json sj = nlohmann::json::array();
    for (const auto& [id, lengths] : seqs) sj.push_back({{"id", id}, {"lengths", lengths}});
    out << nlohmann::json{{"file", in},
                          {"kind", "kv_cache"},
                          {"file_bytes", bytes.size()},
                          {"layers", c.layers},
                          {"kv_heads", c.kv_heads},
                          {"head_dim", c.head_dim},
                          {"key", nlohmann::json::parse(file::spec_to_json(c.key))},
                          {"value", nlohmann::json::parse(file::spec_to_json(c.value))},
                          {"page_tokens", c.page_tokens},
                          {"pages_used", pages_used},
                          {"pages_total", cache.pages_total()},
                          {"page_bytes", cache.page_bytes()},
                          {"sequences", sj},
                          {"bytes_per_token_per_layer", cache.bytes_per_token_per_layer()},
                          {"bytes_per_token", cache.bytes_per_token()},
                          {"fp16_bytes_per_token", cache.fp16_bytes_per_token()},
                          {"compression_vs_fp16", ratio},
                          {"stored_bytes", cache.stored_bytes()},
                          {"used_page_bytes", cache.used_page_bytes()}}
               .dump(2)
        << "\n";
    return 0;
  }
  out << in << ": tqkv KV cache, format version " << file::kVersion << "\n"
      << "  layers           " << c.layers << "\n"
      << "  kv_heads         " << c.kv_heads << " x head_dim " << c.head_dim << "\n"
      << "  key codec        " << describe(c.key) << "\n"
      << "  value codec      " << describe(c.value) << "\n"
      << "  page_tokens      " << c.page_tokens << " (" << cache.page_bytes()
      << " bytes per page, all layers)\n"
      << "  pages            " << pages_used << " used of " << cache.pages_total() << "\n"
      << "  sequences        " << seqs.size() << "\n";
  for (const auto& [id, lengths] : seqs) {
    out << "    id " << id << ": ";
    const bool same = std::all_of(lengths.begin(), lengths.end(),
                                  [&](size_t n) { return n == lengths.front(); });
    if (same) {
      out << lengths.front() << " tokens" << (c.layers > 1 ? " in every layer" : "") << "\n";
    } else {
      out << "tokens per layer";
      for (size_t n : lengths) out << " " << n;
      out << "\n";
    }
  }
  out << "  bytes per token  " << cache.bytes_per_token_per_layer() << " per layer, "
      << cache.bytes_per_token() << " in all layers (float16: " << cache.fp16_bytes_per_token()
      << ")\n"
      << "  compression      " << fmt("%.2f", ratio) << "x vs float16\n"
      << "  stored bytes     " << cache.stored_bytes() << " (pages in use: "
      << cache.used_page_bytes() << ")\n"
      << "  file size        " << bytes.size() << " bytes\n";
  return 0;
}

int info(const std::string& in, bool json, std::ostream& out) {
  const auto bytes = file::read_bytes(in);
  if (file::parse(bytes, in).kind == file::Kind::kv_cache) return info_cache(in, bytes, json, out);
  const auto ev = file::parse_encoded(bytes, in);
  const Codec codec(ev.spec);
  const int d = ev.spec.dim;
  const double per_coord = 8.0 * ev.record_bytes / d;
  if (json) {
    nlohmann::json j = nlohmann::json::parse(file::spec_to_json(ev.spec));
    out << nlohmann::json{{"file", in},
                          {"kind", "encoded_vectors"},
                          {"file_bytes", bytes.size()},
                          {"codec", j},
                          {"count", ev.count},
                          {"record_bytes", ev.record_bytes},
                          {"bits_per_coordinate", per_coord},
                          {"compression_vs_fp16", 2.0 * d / ev.record_bytes},
                          {"compression_vs_fp32", 4.0 * d / ev.record_bytes}}
               .dump(2)
        << "\n";
    return 0;
  }
  out << in << ": tqkv encoded vectors, format version " << file::kVersion << "\n"
      << "  vectors          " << ev.count << " x dim " << d << "\n"
      << "  codec            " << describe(ev.spec) << "\n";
  for (size_t g = 0; g < codec.groups().size(); ++g) {
    const auto& grp = codec.groups()[g];
    out << "  group " << g << "          " << grp.dim << " channels at " << grp.bits
        << " bits (" << grp.mse_bits << " Lloyd-Max" << (grp.qjl ? " + 1 QJL" : "")
        << "), rotation " << to_string(codec.rotation(g).kind()) << "\n";
  }
  if (!ev.spec.outlier_channels.empty()) {
    out << "  outlier channels";
    for (int c : ev.spec.outlier_channels) out << " " << c;
    out << "\n";
  }
  out << "  bytes per vector " << ev.record_bytes << " (" << fmt("%.3f", per_coord)
      << " bits per coordinate, norms included)\n"
      << "  compression      " << fmt("%.2f", 2.0 * d / ev.record_bytes) << "x vs float16, "
      << fmt("%.2f", 4.0 * d / ev.record_bytes) << "x vs float32\n"
      << "  file size        " << bytes.size() << " bytes\n";
  return 0;
}

// ---- eval distortion / demo ----------------------------------------------------------------

nlohmann::json to_json(const DistortionRow& r) {
  return {{"dim", r.spec.dim},
          {"bits", r.spec.bits},
          {"codec", to_string(r.spec.kind)},
          {"rotation", to_string(r.spec.rotation)},
          {"bytes_per_vector", r.record_bytes},
          {"compression_vs_fp16", r.compression_vs_fp16},
          {"mse", r.mse},
          {"mse_theory", r.mse_theory},
          {"mse_paper", r.mse_paper > 0 ? nlohmann::json(r.mse_paper) : nlohmann::json()},
          {"lower_bound", r.lower_bound},
          {"ip_bias", r.ip_bias},
          {"ip_bias_stderr", r.ip_bias_stderr},
          {"ip_var_times_d", r.ip_var_d},
          {"ip_var_times_d_theory",
           r.ip_var_d_theory > 0 ? nlohmann::json(r.ip_var_d_theory) : nlohmann::json()}};
}

void print_table(const std::vector<DistortionRow>& rows, std::ostream& out) {
  out << "codec  bits  bytes/vec  vs fp16  MSE measured  MSE theory  paper   4^-b      "
         "IP bias (±se)          IP var*d  theory\n";
  for (const auto& r : rows) {
    char line[256];
    std::snprintf(line, sizeof line,
                  "%-5s  %4.3g  %9zu  %6.2fx  %12.4g  %10.4g  %-6s  %8.3g  %+.1e (±%.1e)  %8.4g  %s\n",
                  to_string(r.spec.kind), r.spec.bits, r.record_bytes, r.compression_vs_fp16,
                  r.mse, r.mse_theory, r.mse_paper > 0 ? fmt("%.3g", r.mse_paper).c_str() : "-",
                  r.lower_bound, r.ip_bias, r.ip_bias_stderr, r.ip_var_d,
                  r.ip_var_d_theory > 0 ? fmt("%.4f", r.ip_var_d_theory).c_str() : "-");
    out << line;
  }
}

int eval_distortion(int dim, const std::string& bits_list, const CodecOptions& opt,
                    size_t samples, uint64_t data_seed, bool json, std::ostream& out) {
  TQKV_CHECK(samples >= 2, "--samples: need at least 2, got ", samples);
  std::vector<DistortionRow> rows;
  for (const auto& b : split_list(bits_list))
    rows.push_back(measure_distortion(opt.spec(dim, b), samples, data_seed));
  if (json) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& r : rows) arr.push_back(to_json(r));
    out << arr.dump(2) << "\n";
    return 0;
  }
  out << "TurboQuant distortion on " << samples << " random unit vectors, dim " << dim
      << " (MSE = mean |u - u_hat|^2; IP = <q, x_hat> - <q, x> for random unit q)\n";
  print_table(rows, out);
  return 0;
}

int demo(size_t samples, size_t context, std::ostream& out) {
  TQKV_CHECK(samples >= 2, "--samples: need at least 2, got ", samples);
  TQKV_CHECK(context >= 1, "--context: need at least 1 token, got ", context);
  out << "tqkv demo: TurboQuant codecs on " << samples
      << " built-in random unit vectors, dim 128 (an LLM head dimension)\n\n";
  std::vector<DistortionRow> rows;
  CodecOptions opt;
  for (const char* b : {"2", "2.5", "3", "3.5", "4", "8"})
    rows.push_back(measure_distortion(opt.spec(128, b), samples, 1));
  opt.codec = "prod";
  for (const char* b : {"3", "4"}) rows.push_back(measure_distortion(opt.spec(128, b), samples, 1));
  print_table(rows, out);
  out << "\nbytes/vec counts codes plus the float16 norm (and the QJL residual norm for prod);\n"
         "a float16 vector is 256 bytes. 'MSE theory' integrates the Lloyd-Max codebook for the\n"
         "exact coordinate density; 'paper' is the TurboQuant paper's figure; 4^-b bounds any\n"
         "quantizer. prod trades MSE for unbiased inner products (IP bias ~ 0).\n";
  out << "\n";
  demo_attention(context, out);
  try {
    const auto gpus = list_gpus();
    out << "\nGPU backend: built, " << gpus.size() << " GPU(s) visible\n";
  } catch (const Error& e) {
    out << "\nGPU backend: " << e.what() << "\n";
  }
  return 0;
}

// The options every bench subcommand takes (BenchShapeArgs).
void add_shape_options(CLI::App* sub, BenchShapeArgs& a, const std::string& repeats_help) {
  sub->add_option("--batch", a.batch, "comma-separated batch sizes")->capture_default_str();
  sub->add_option("--context", a.context, "comma-separated context lengths (tokens)")
      ->capture_default_str();
  sub->add_option("--bits", a.bits, "comma-separated bit widths (keys and values)")
      ->capture_default_str();
  sub->add_option("--q-heads", a.q_heads, "query heads")->capture_default_str();
  sub->add_option("--kv-heads", a.kv_heads, "KV heads")->capture_default_str();
  sub->add_option("--dim", a.dim, "head dimension")->capture_default_str();
  sub->add_option("--repeats", a.repeats, repeats_help)->capture_default_str();
  sub->add_flag("--json", a.json, "print a JSON array");
}

}  // namespace

int run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  CLI::App app{"tqkv: TurboQuant-compressed KV cache and vector codecs", "tqkv"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tqkv 0.1.0");

  std::string in, out_path, dtype = "f32";
  CodecOptions opt;
  auto* q = app.add_subcommand("quantize", "encode a [N, d] .npy array into a .tqkv file");
  q->add_option("--in", in, "input .npy (float32 or float16, 2-D [N, d])")->required();
  q->add_option("--out", out_path, "output .tqkv file")->required();
  opt.add_to(q);

  auto* dq = app.add_subcommand("dequantize", "decode a .tqkv file into a float32 .npy [N, d]");
  dq->add_option("--in", in, "input .tqkv file")->required();
  dq->add_option("--out", out_path, "output .npy file")->required();
  dq->add_option("--dtype", dtype, "f32 or f16")->capture_default_str();

  bool json = false;
  auto* inf = app.add_subcommand("info", "show a .tqkv file's parameters and sizes");
  inf->add_option("file", in, ".tqkv file")->required();
  inf->add_flag("--json", json, "print JSON");

  auto* ev = app.add_subcommand("eval", "measure quality");
  ev->require_subcommand(1);
  auto* dist = ev->add_subcommand("distortion", "MSE and inner-product distortion vs theory");
  int dim = 128;
  std::string bits_list = "1,2,3,4";
  size_t samples = 100000;
  uint64_t data_seed = 1;
  dist->add_option("--dim", dim, "vector dimension")->capture_default_str();
  dist->add_option("--bits", bits_list, "comma-separated bit widths")->capture_default_str();
  dist->add_option("--samples", samples, "random unit vectors")->capture_default_str();
  dist->add_option("--data-seed", data_seed, "seed of the random data")->capture_default_str();
  dist->add_flag("--json", json, "print a JSON array");
  opt.add_to(dist, false);

  EvalModelArgs em;
  auto* evm = ev->add_subcommand("model", "what each KV cache configuration costs a real model");
  evm->add_option("--model", em.model, "ONNX file of the model (tools/fetch-model.sh)")
      ->required();
  evm->add_option("--tokens", em.tokens, "tokens per sampled sequence")->capture_default_str();
  evm->add_option("--sequences", em.sequences, "sequences")->capture_default_str();
  evm->add_option("--configs", em.configs,
                  "comma-separated: full, q4_0, q8_0, k<bits>[p]v<bits>[p][-dense][-center] (p: "
                  "prod; -center: centering codecs), bound<bits>[-center] (the distortion-rate "
                  "bound for Gaussian coordinates: a reference, not a codec)")
      ->capture_default_str();
  evm->add_option("--seed", em.seed, "seed of the sampled sequences")->capture_default_str();
  evm->add_flag("--quantized-activations", em.quantized_activations,
                "round activations to uint8 as the exported graph does (its rounding adds a "
                "KL floor of ~0.02 to any cache change)");
  evm->add_flag("--json", em.json, "print a JSON array");
  evm->add_flag("--kv-stats", em.kv_stats,
                "instead: norms, outlier channels and TurboQuant distortion of the real keys and "
                "values (float32 cache) against random data");
  evm->add_option("--kv-bits", em.kv_bits, "with --kv-stats: bit width of the distortion columns")
      ->capture_default_str();
  evm->add_option("--plot", em.plot,
                  "draw mean KL and top-1 agreement against bits per coordinate into this PNG");

  size_t demo_samples = 20000, demo_context = 8192, demo_tokens = 256;
  std::string demo_model_path;
  uint64_t demo_seed = 1;
  auto* dm = app.add_subcommand(
      "demo", "codecs and attention on built-in synthetic data, or (--model) on a real model");
  dm->add_option("--samples", demo_samples, "random unit vectors")->capture_default_str();
  dm->add_option("--context", demo_context, "tokens in the attention demo's cache")
      ->capture_default_str();
  dm->add_option("--model", demo_model_path,
                 "ONNX file of a Llama model (tools/fetch-model.sh): run the demo on it instead");
  dm->add_option("--tokens", demo_tokens, "with --model: tokens of the sampled sequence")
      ->capture_default_str();
  dm->add_option("--seed", demo_seed, "with --model: seed of the sampled sequence")
      ->capture_default_str();

  AttendArgs at;
  auto* att = app.add_subcommand(
      "attend", "decode attention of one query token over K/V quantized into a KV cache");
  att->add_option("--q", at.q, "query .npy [H_q, d] (float32 or float16)")->required();
  att->add_option("--k", at.k, "keys .npy [H_kv, T, d]")->required();
  att->add_option("--v", at.v, "values .npy [H_kv, T, d]")->required();
  att->add_option("--out", at.out, "output .npy [H_q, d] float32")->required();
  att->footer("K and V are appended to the cache in chunks of 256 tokens; with fractional bits "
              "each KV head chooses its outlier channels from its first chunk.");
  att->add_option("--key-bits", at.key_bits, "key bits per coordinate (fractional allowed)")
      ->capture_default_str();
  att->add_option("--value-bits", at.value_bits, "value bits per coordinate")
      ->capture_default_str();
  att->add_option("--codec", at.codec, "mse or prod (keys and values)")->capture_default_str();
  att->add_option("--rotation", at.rotation, "auto, hadamard or dense")->capture_default_str();
  att->add_option("--seed", at.seed, "key codec seed; the value codec uses seed + 1")
      ->capture_default_str();
  att->add_option("--scale", at.scale, "softmax scale; 0 means 1/sqrt(d)")->capture_default_str();
  att->add_option("--window", at.window, "attend to the last W tokens only; 0: all")
      ->capture_default_str();
  att->add_flag("--reference", at.reference,
                "float64 reference on the dequantized codes instead of the fused kernels");

  BenchDecodeArgs bd;
  auto* bench = app.add_subcommand("bench", "measure speed");
  bench->require_subcommand(1);
  auto* bdec = bench->add_subcommand(
      "decode", "decode attention: fused on the codes vs dequantize-then-attend vs dense float32");
  bdec->add_option("--device", bd.device, "cpu, cuda or cuda:N")->capture_default_str();
  add_shape_options(bdec, bd, "timed runs per measurement (best is kept)");
  bdec->add_option("--threads", bd.threads, "CPU threads; 0: all")->capture_default_str();
  bdec->add_option("--codec", bd.codec, "mse or prod")->capture_default_str();

  BenchShardedArgs bs;
  auto* bsh = bench->add_subcommand(
      "sharded", "decode on a cache spread over several devices (sequence or head placement)");
  bsh->add_option("--devices", bs.devices, "comma-separated devices, one shard each (cpu: "
                  "simulated ranks; cuda:N: distinct GPUs, NCCL)")->capture_default_str();
  bsh->add_option("--worlds", bs.worlds, "comma-separated shard counts (the first devices); "
                  "default: 1 and all")->capture_default_str();
  bsh->add_option("--placement", bs.placement, "sequence or heads")->capture_default_str();
  add_shape_options(bsh, bs, "timed steps (the median is kept)");

  std::vector<std::string> argv_rev(args.rbegin(), args.rend());
  try {
    app.parse(argv_rev);
  } catch (const CLI::CallForHelp&) {
    out << app.help();  // delegates to the subcommand that asked for help
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    out << app.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::CallForVersion& e) {
    out << e.what() << "\n";
    return 0;
  } catch (const CLI::ParseError& e) {
    err << "tqkv: " << e.what() << "\nRun 'tqkv --help' for usage.\n";
    return 2;
  }
  try {
    if (q->parsed()) return quantize(in, out_path, opt, out);
    if (dq->parsed()) return dequantize(in, out_path, dtype, out);
    if (inf->parsed()) return info(in, json, out);
    if (dist->parsed())
      return eval_distortion(dim, bits_list, opt, samples, data_seed, json, out);
    if (evm->parsed()) return eval_model(em, out, err);
    if (dm->parsed() && !demo_model_path.empty())
      return demo_model(demo_model_path, demo_tokens, demo_seed, out, err);
    if (dm->parsed()) return demo(demo_samples, demo_context, out);
    if (att->parsed()) return attend(at, out);
    if (bdec->parsed()) return bench_decode(bd, out);
    if (bsh->parsed()) return bench_sharded(bs, out);
  } catch (const Error& e) {
    err << "tqkv: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    err << "tqkv: internal error: " << e.what() << "\n";
    return 1;
  }
  return 2;
}

}  // namespace tqkv::cli
