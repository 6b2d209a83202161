// Real keys and values against random data (kv_stats.hpp).
#include "kv_stats.hpp"

#include <algorithm>
#include <cmath>

#include "tqkv/codebook.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cli {

namespace {

size_t count_vectors(std::span<const float> x, int dim) {
  TQKV_CHECK(dim > 0 && x.size() % size_t(dim) == 0, "kv stats: ", x.size(),
             " values are not vectors of ", dim);
  return x.size() / size_t(dim);
}

double norm(const float* v, int dim) {
  double s = 0;
  for (int j = 0; j < dim; ++j) s += double(v[j]) * v[j];
  return std::sqrt(s);
}

// Mean and standard error of the mean of independent samples.
Distortion mean_and_error(const std::vector<double>& samples) {
  Distortion d;
  const double n = double(samples.size());
  for (double s : samples) d.mean += s / n;
  if (samples.size() < 2) return d;
  double var = 0;
  for (double s : samples) var += (s - d.mean) * (s - d.mean) / (n - 1);
  d.std_error = std::sqrt(var / n);
  return d;
}

}  // namespace

ChannelStats channel_stats(std::span<const float> x, int dim) {
  const size_t n = count_vectors(x, dim);
  TQKV_CHECK(n > 0, "kv stats: no vectors");
  ChannelStats c;
  c.mean_abs.assign(size_t(dim), 0.0);
  for (size_t i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) c.mean_abs[size_t(j)] += std::abs(double(x[i * size_t(dim) + size_t(j)]));
  for (double& m : c.mean_abs) m /= double(n);
  std::vector<double> sorted = c.mean_abs;
  std::sort(sorted.begin(), sorted.end());
  const size_t mid = sorted.size() / 2;
  c.median = sorted.size() % 2 ? sorted[mid] : 0.5 * (sorted[mid - 1] + sorted[mid]);
  for (int j = 0; j < dim; ++j) {
    const double ratio = c.median > 0 ? c.mean_abs[size_t(j)] / c.median : INFINITY;
    c.max_ratio = std::max(c.max_ratio, ratio);
    if (ratio >= kOutlierRatio) c.outliers.push_back(j);
  }
  return c;
}

NormStats norm_stats(std::span<const float> x, int dim) {
  const size_t n = count_vectors(x, dim);
  TQKV_CHECK(n > 0, "kv stats: no vectors");
  NormStats s{0, INFINITY, 0};
  for (size_t i = 0; i < n; ++i) {
    const double v = norm(x.data() + i * size_t(dim), dim);
    s.mean += v / double(n);
    s.min = std::min(s.min, v);
    s.max = std::max(s.max, v);
  }
  return s;
}

Distortion codec_distortion(CodecSpec spec, std::span<const float> x, int seeds) {
  const size_t n = count_vectors(x, spec.dim);
  TQKV_CHECK(n > 0 && seeds >= 1, "kv stats: no vectors or no seeds");
  std::vector<double> per_seed;
  const uint64_t first = spec.seed;
  for (int s = 0; s < seeds; ++s) {
    spec.seed = first + uint64_t(s);
    const Codec codec(spec);
    std::vector<uint8_t> records(n * codec.record_bytes());
    std::vector<float> back(x.size());
    codec.encode(x.data(), n, records.data());
    codec.decode(records.data(), n, back.data());
    double sum = 0;
    size_t used = 0;
    for (size_t i = 0; i < n; ++i) {
      const float* v = x.data() + i * size_t(spec.dim);
      const double nv = norm(v, spec.dim);
      if (nv == 0) continue;
      double e = 0;
      for (int j = 0; j < spec.dim; ++j) {
        const double diff = (double(v[j]) - back[i * size_t(spec.dim) + size_t(j)]) / nv;
        e += diff * diff;
      }
      sum += e;
      ++used;
    }
    TQKV_CHECK(used > 0, "kv stats: every vector is zero");
    per_seed.push_back(sum / double(used));
  }
  return mean_and_error(per_seed);
}

Distortion unrotated_distortion(std::span<const float> x, int dim, int bits) {
  const size_t n = count_vectors(x, dim);
  const auto book = Codebook::get(dim, bits);
  const auto bounds = book->boundaries_f32();
  const auto centroids = book->centroids_f32();
  std::vector<double> per_vector;
  for (size_t i = 0; i < n; ++i) {
    const float* v = x.data() + i * size_t(dim);
    const double nv = norm(v, dim);
    if (nv == 0) continue;
    double e = 0;
    for (int j = 0; j < dim; ++j) {
      const float u = float(v[j] / nv);
      const size_t idx = size_t(std::lower_bound(bounds.begin(), bounds.end(), u) - bounds.begin());
      const double diff = double(u) - centroids[idx];
      e += diff * diff;
    }
    per_vector.push_back(e);
  }
  TQKV_CHECK(!per_vector.empty(), "kv stats: every vector is zero");
  return mean_and_error(per_vector);
}

std::vector<KvStatsRow> kv_stats(const std::vector<std::vector<float>>& keys,
                                 const std::vector<std::vector<float>>& values, int kv_heads,
                                 int dim, int bits, int seeds) {
  TQKV_CHECK(keys.size() == values.size() && kv_heads > 0, "kv stats: bad shape");
  std::vector<KvStatsRow> rows;
  for (bool is_key : {true, false})
    for (size_t l = 0; l < keys.size(); ++l)
      for (int h = 0; h < kv_heads; ++h) {
        const std::vector<float>& all = is_key ? keys[l] : values[l];
        const size_t row = size_t(kv_heads) * size_t(dim), tokens = all.size() / row;
        std::vector<float> x(tokens * size_t(dim));  // this head's vectors, contiguous
        for (size_t t = 0; t < tokens; ++t)
          std::copy_n(all.begin() + std::ptrdiff_t(t * row + size_t(h) * size_t(dim)), dim,
                      x.begin() + std::ptrdiff_t(t * size_t(dim)));
        KvStatsRow r;
        r.layer = int(l);
        r.head = h;
        r.keys = is_key;
        r.vectors = tokens;
        r.norms = norm_stats(x, dim);
        r.channels = channel_stats(x, dim);
        r.theory = Codebook::get(dim, bits)->distortion();
        CodecSpec spec;
        spec.dim = dim;
        spec.bits = bits;
        spec.norm_format = NormFormat::f32;  // the rotation and codebook alone
        r.hadamard = {NAN, NAN};  // the Hadamard transform needs a power of two
        if ((dim & (dim - 1)) == 0) {
          spec.rotation = RotationChoice::hadamard;
          r.hadamard = codec_distortion(spec, x, seeds);
        }
        spec.rotation = RotationChoice::dense;
        r.dense = codec_distortion(spec, x, seeds);
        r.unrotated = unrotated_distortion(x, dim, bits);
        rows.push_back(std::move(r));
      }
  return rows;
}

}  // namespace tqkv::cli
