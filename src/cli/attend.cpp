// tqkv attend: decode attention of one query token over K/V that go through the compressed cache.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ostream>

#include "commands.hpp"
#include "tqkv/attention.hpp"
#include "tqkv/error.hpp"
#include "tqkv/npy.hpp"

namespace tqkv::cli {
namespace {

// Tokens appended to the cache per call: [chunk, H_kv, d] gathered from [H_kv, T, d]. With
// fractional bits each KV head chooses its outlier channels from the first chunk, as a serving
// cache does from its first prefill chunk (the help text says so).
constexpr size_t kChunkTokens = 256;

std::string shape_text(const std::vector<size_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Names the first non-finite element by its index in the array's shape.
void check_finite(const npy::Array& a, const std::string& path) {
  const auto it =
      std::find_if(a.data.begin(), a.data.end(), [](float x) { return !std::isfinite(x); });
  if (it == a.data.end()) return;
  size_t i = size_t(it - a.data.begin());
  std::vector<size_t> index(a.shape.size());
  for (size_t k = a.shape.size(); k-- > 0;) {
    index[k] = i % a.shape[k];
    i /= a.shape[k];
  }
  throw Error(detail::concat(path, ": element ", shape_text(index), " is not finite (", *it, ")"));
}

}  // namespace

int attend(const AttendArgs& a, std::ostream& out) {
  const npy::Array q = npy::read(a.q), k = npy::read(a.k), v = npy::read(a.v);
  TQKV_CHECK(q.shape.size() == 2, a.q, ": expected a 2-D query array [H_q, d], got shape ",
             shape_text(q.shape));
  TQKV_CHECK(k.shape.size() == 3, a.k, ": expected a 3-D key array [H_kv, T, d], got shape ",
             shape_text(k.shape));
  TQKV_CHECK(v.shape.size() == 3, a.v, ": expected a 3-D value array [H_kv, T, d], got shape ",
             shape_text(v.shape));
  TQKV_CHECK(k.shape == v.shape, a.k, " and ", a.v, ": keys ", shape_text(k.shape),
             " and values ", shape_text(v.shape), " must have the same shape");
  const size_t Hq = q.shape[0], Hkv = k.shape[0], T = k.shape[1], d = k.shape[2];
  TQKV_CHECK(q.shape[1] == d, a.q, ": query head dimension ", q.shape[1],
             " does not match the keys' ", d, " (", a.k, ")");
  TQKV_CHECK(Hq >= 1, a.q, ": no query heads");
  TQKV_CHECK(Hkv >= 1 && T >= 1, a.k, ": no keys (shape ", shape_text(k.shape), ")");
  TQKV_CHECK(Hq % Hkv == 0, a.q, ": ", Hq, " query heads is not a multiple of the ", Hkv,
             " KV heads of ", a.k);
  TQKV_CHECK(d >= 8 && d <= 4096 && d % 8 == 0, a.k, ": head dimension ", d,
             " is not supported (the KV cache needs a multiple of 8 in 8..4096)");
  TQKV_CHECK(std::isfinite(a.scale) && a.scale >= 0, "--scale: must be positive (or 0 for ",
             "1/sqrt(d)), got ", a.scale);
  check_finite(q, a.q);
  check_finite(k, a.k);
  check_finite(v, a.v);

  CacheConfig config;
  config.layers = 1;
  config.kv_heads = int(Hkv);
  config.head_dim = int(d);
  config.key.dim = config.value.dim = int(d);
  config.key.kind = config.value.kind = parse_codec_kind(a.codec);
  config.key.rotation = config.value.rotation = parse_rotation_choice(a.rotation);
  config.key.bits = parse_bits(a.key_bits, "--key-bits");
  config.value.bits = parse_bits(a.value_bits, "--value-bits");
  config.key.seed = a.seed;
  config.value.seed = a.seed + 1;
  check_cache_codec(config.key, false, int(d), "--key-bits " + a.key_bits);
  check_cache_codec(config.value, true, int(d), "--value-bits " + a.value_bits);
  const size_t lengths[1] = {T};
  config.max_pages = config.pages_for(lengths);
  KVCache cache(config);
  const SequenceId seq = cache.add_sequence();
  append_head_major(cache, seq, k.data.data(), v.data.data(), T, kChunkTokens);

  AttentionOptions options;
  options.scale = a.scale;
  options.window = a.window;
  std::vector<float> o(Hq * d);
  const SequenceId seqs[1] = {seq};
  const size_t ones[1] = {1};
  const auto t0 = std::chrono::steady_clock::now();
  if (a.reference)
    attend_reference(cache, 0, seqs, ones, q.data.data(), int(Hq), o.data(), options);
  else
    attend_decode(cache, 0, seqs, q.data.data(), int(Hq), o.data(), options);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const size_t shape[2] = {Hq, d};
  npy::write(a.out, o, shape);

  out << "attend (" << (a.reference ? "float64 reference" : "fused decode") << "): " << Hq
      << " query heads over " << T << " tokens x " << Hkv << " KV heads, dim " << d << "; keys "
      << config.key.bits << "-bit, values " << config.value.bits << "-bit "
      << to_string(config.key.kind) << ": " << cache.bytes_per_token_per_layer()
      << " bytes per token, "
      << fmt("%.2f", double(cache.fp16_bytes_per_token()) / double(cache.bytes_per_token()))
      << "x smaller than float16; " << fmt("%.3f", ms) << " ms -> " << a.out << "\n";
  return 0;
}

}  // namespace tqkv::cli

namespace tqkv::cli {

void append_head_major(KVCache& cache, SequenceId seq, const float* k, const float* v,
                       size_t tokens, size_t chunk) {
  const size_t H = size_t(cache.config().kv_heads), d = size_t(cache.config().head_dim);
  std::vector<float> kc, vc;
  for (size_t t0 = 0; t0 < tokens; t0 += chunk) {
    const size_t n = std::min(chunk, tokens - t0);
    kc.resize(n * H * d);
    vc.resize(kc.size());
    for (size_t t = 0; t < n; ++t)
      for (size_t h = 0; h < H; ++h) {
        const size_t from = (h * tokens + t0 + t) * d, to = (t * H + h) * d;
        std::copy_n(k + from, d, &kc[to]);
        std::copy_n(v + from, d, &vc[to]);
      }
    cache.append(seq, 0, kc.data(), vc.data(), n);
  }
}

}  // namespace tqkv::cli
