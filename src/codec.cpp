#include "tqkv/codec.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>

#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "tqkv/random.hpp"
#include "tqkv/reduce.hpp"
#include "threads.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tqkv {

// ---------------------------------------------------------------------------------------------
// Names

const char* to_string(CodecKind kind) { return kind == CodecKind::mse ? "mse" : "prod"; }
const char* to_string(RotationChoice c) {
  return c == RotationChoice::automatic ? "auto" : c == RotationChoice::hadamard ? "hadamard"
                                                                                 : "dense";
}
const char* to_string(NormFormat f) { return f == NormFormat::f16 ? "f16" : "f32"; }

CodecKind parse_codec_kind(const std::string& s) {
  if (s == "mse") return CodecKind::mse;
  if (s == "prod") return CodecKind::prod;
  throw Error("unknown codec '" + s + "' (expected mse or prod)");
}
RotationChoice parse_rotation_choice(const std::string& s) {
  if (s == "auto" || s == "automatic") return RotationChoice::automatic;
  if (s == "hadamard") return RotationChoice::hadamard;
  if (s == "dense") return RotationChoice::dense;
  throw Error("unknown rotation '" + s + "' (expected auto, hadamard or dense)");
}
NormFormat parse_norm_format(const std::string& s) {
  if (s == "f16") return NormFormat::f16;
  if (s == "f32") return NormFormat::f32;
  throw Error("unknown norm format '" + s + "' (expected f16 or f32)");
}

// ---------------------------------------------------------------------------------------------
// Threads

int detail::cgroup_quota_cpus(const std::string& dir) {
  long long quota = -1, period = 0;
  if (std::ifstream v2(dir + "/cpu.max"); v2) {
    std::string q;
    if (!(v2 >> q >> period) || q == "max") return 0;
    quota = std::atoll(q.c_str());
  } else {
    std::ifstream q1(dir + "/cpu.cfs_quota_us"), p1(dir + "/cpu.cfs_period_us");
    if (!(q1 >> quota) || !(p1 >> period)) return 0;
  }
  if (quota <= 0 || period <= 0) return 0;
  return int(std::max<long long>(1, (quota + period - 1) / period));
}

namespace {
std::atomic<int> g_threads{0};

// The CPUs a container grants this process. OpenMP's default counts the CPUs of the affinity
// mask, which under a CPU quota can be the whole host: dozens of spinning threads on a quota of
// two CPUs are throttled by the scheduler and run 10-20x slower than two threads.
int granted_cpus() {
  int best = 0;
  auto take = [&](int n) { if (n > 0 && (best == 0 || n < best)) best = n; };
  // This process's own cgroup (v2: "0::/path"; v1: "N:cpu,cpuacct:/path"), then the roots.
  std::ifstream self("/proc/self/cgroup");
  for (std::string line; std::getline(self, line);) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty()) take(detail::cgroup_quota_cpus("/sys/fs/cgroup" + path));
    else if (controllers.find("cpu") != std::string::npos && path != "/")
      for (const char* root : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"})
        take(detail::cgroup_quota_cpus(root + path));
  }
  for (const char* root : {"/sys/fs/cgroup", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"})
    take(detail::cgroup_quota_cpus(root));
  return best;
}

int thread_count() {
#ifdef _OPENMP
  const int n = g_threads.load();
  if (n > 0) return n;
  // OMP_NUM_THREADS, when set, is the user's choice; otherwise no more than the quota allows.
  static const int granted = std::getenv("OMP_NUM_THREADS") ? 0 : granted_cpus();
  const int omp = omp_get_max_threads();
  return granted > 0 ? std::min(omp, granted) : omp;
#else
  return 1;
#endif
}
// Batches smaller than this run on the calling thread: thread start-up would cost more.
constexpr size_t kParallelMin = 512;
}  // namespace

int set_num_threads(int n) {
  TQKV_CHECK(n >= 0, "set_num_threads: thread count must be >= 0, got ", n);
  return g_threads.exchange(n);
}
int num_threads() { return thread_count(); }

// ---------------------------------------------------------------------------------------------
// Input rows

void row_to_float(const void* x, ScalarType t, size_t i, int d, float* out) {
  const size_t off = i * size_t(d);
  switch (t) {
    case ScalarType::f32:
      std::memcpy(out, static_cast<const float*>(x) + off, size_t(d) * 4);
      return;
    case ScalarType::f16:
      for (int j = 0; j < d; ++j) out[j] = half_to_float(static_cast<const uint16_t*>(x)[off + j]);
      return;
    case ScalarType::bf16:
      for (int j = 0; j < d; ++j) out[j] = bf16_to_float(static_cast<const uint16_t*>(x)[off + j]);
      return;
  }
  throw Error("unknown scalar type");
}

// ---------------------------------------------------------------------------------------------
// Implementation

namespace {

constexpr float kSqrtHalfPi = 1.2533141373155003f;  // sqrt(π/2)
constexpr int kMaxDenseDim = 4096;

// The per-group tables: everything but the channel list, which may come later.
struct GroupTables {
  Rotation rotation;
  std::shared_ptr<const Codebook> codebook;  // null when mse_bits == 0
  std::vector<float> s, s_transpose;         // QJL matrix (prod), row-major
  float qjl_factor = 0;                      // sqrt(π/2) / d_g
};

size_t norm_bytes(NormFormat f) { return f == NormFormat::f16 ? 2 : 4; }

void store_scalar(NormFormat f, float v, uint8_t* p) {
  if (f == NormFormat::f16) {
    const uint16_t h = float_to_half(v);
    std::memcpy(p, &h, 2);
  } else {
    std::memcpy(p, &v, 4);
  }
}
float load_scalar(NormFormat f, const uint8_t* p) {
  if (f == NormFormat::f16) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_to_float(h);
  }
  float v;
  std::memcpy(&v, p, 4);
  return v;
}


constexpr int kQuantizeBlock = 64;

// idx_j = number of boundaries strictly below y_j. Small codebooks count over the positive half
// of the boundaries only (the codebook is exactly antisymmetric, with a boundary at 0):
//   y > 0:  idx = L/2 + #{p < y}
//   y <= 0: idx = L/2 − 1 − #{p <= −y} = L/2 − 1 − #{p < nextup(−y)}
// where nextup of a non-negative float is its bit pattern plus one. That is the same integer as
// the plain count, in half the comparisons, and the block loops vectorize. Large codebooks use a
// branchless binary search.
template <int B>
void quantize(const float* y, int d, const float* boundaries, uint8_t* idx) {
  if constexpr (B <= 4) {
    constexpr int kHalf = 1 << (B - 1);  // L/2
    const float* positive = boundaries + kHalf;  // the L/2 − 1 boundaries above 0
    for (int j0 = 0; j0 < d; j0 += kQuantizeBlock) {
      float t[kQuantizeBlock];
      int32_t count[kQuantizeBlock] = {};
      for (int j = 0; j < kQuantizeBlock; ++j) {
        const float v = y[j0 + j];
        const float nextup_neg = std::bit_cast<float>(std::bit_cast<uint32_t>(-v) + 1u);
        t[j] = v > 0.0f ? v : nextup_neg;
      }
      for (int k = 0; k < kHalf - 1; ++k) {
        const float b = positive[k];
        for (int j = 0; j < kQuantizeBlock; ++j) count[j] += int32_t(b < t[j]);
      }
      const int m = std::min(kQuantizeBlock, d - j0);
      for (int j = 0; j < m; ++j)
        idx[j0 + j] = uint8_t(y[j0 + j] > 0.0f ? kHalf + count[j] : kHalf - 1 - count[j]);
    }
  } else {
    for (int j = 0; j < d; ++j) {
      int c = 0;
      for (int step = 1 << (B - 1); step > 0; step >>= 1)
        if (boundaries[c + step - 1] < y[j]) c += step;
      idx[j] = uint8_t(c);
    }
  }
}

struct Scratch {
  explicit Scratch(int d)
      : x(size_t(d)), c(size_t(d)), g(size_t(d)), w(padded(d)), r(size_t(d)), idx(size_t(d)) {}
  // w holds the rotated vector that quantize() reads in whole blocks; the padding stays zero.
  static size_t padded(int d) {
    return size_t((d + kQuantizeBlock - 1) / kQuantizeBlock * kQuantizeBlock);
  }
  std::vector<float> x, c, g, w, r;  // c: the centered row
  std::vector<uint8_t> idx;
};

}  // namespace

struct Codec::Impl {
  CodecSpec spec;
  size_t record_bytes = 0;
  std::vector<ChannelGroup> groups;
  std::vector<GroupTables> tables;
  bool fractional = false;
  bool needs_channels = false;  // fractional, and no outlier channels given (fixed at construction)
  std::atomic<bool> ready{false};
  std::mutex calibrate_mutex;

  void set_channels(std::vector<int> outliers);
  // Takes the offset and outlier channels of `chosen` (calibrate_mutex held) and becomes ready.
  void install(const CodecSpec& chosen);
  // The offset and outlier channels that batch x would give (as calibrated_spec describes).
  CodecSpec calibrated(const void* x, ScalarType t, size_t n) const;
  // The same from the batch's offset and channel energies (Codec::calibrated_spec's second form).
  CodecSpec from_statistics(std::span<const float> offset, std::span<const double> energy) const;
  void require_ready(const char* what) const {
    if (ready.load(std::memory_order_acquire)) return;
    throw Error(detail::concat(what, ": this codec has not chosen its ",
                               needs_channels ? "outlier channels" : "offset",
                               " yet; encode a batch first or give CodecSpec::",
                               needs_channels ? "outlier_channels" : "offset"));
  }
  // Row x less `offset` (into buf), or x itself for an empty offset (a codec that does not center).
  static const float* centered(const float* x, const std::vector<float>& offset, float* buf) {
    if (offset.empty()) return x;
    for (size_t j = 0; j < offset.size(); ++j) buf[j] = x[j] - offset[j];
    return buf;
  }
  const float* centered(const float* x, float* buf) const { return centered(x, spec.offset, buf); }
  // Group g's channels of row x: x itself for a single group, else gathered into buf.
  const float* gather(const ChannelGroup& g, const float* x, float* buf) const {
    if (groups.size() == 1) return x;
    for (int j = 0; j < g.dim; ++j) buf[j] = x[g.channels[size_t(j)]];
    return buf;
  }
  // Empty if the row (as given, before centering) can be encoded; otherwise a message saying why.
  std::string check_row(const float* x, size_t i, Scratch& s) const;
  void encode_row(const float* x, uint8_t* rec, Scratch& s) const;
  void decode_row(const uint8_t* rec, float* out, Scratch& s) const;
};

// True when every element is finite: an exponent-bit test that vectorizes, unlike isfinite.
bool all_finite(const float* x, int d) {
  uint32_t bad = 0;
  for (int j = 0; j < d; ++j)
    bad |= ((std::bit_cast<uint32_t>(x[j]) & 0x7f800000u) == 0x7f800000u) ? 1u : 0u;
  return bad == 0;
}

std::string Codec::Impl::check_row(const float* x, size_t i, Scratch& s) const {
  if (!all_finite(x, spec.dim))
    for (int j = 0; j < spec.dim; ++j)
      if (!std::isfinite(x[j]))
        return detail::concat("encode: vector ", i, " has a non-finite element (", x[j],
                            " at index ", j, ")");
  const float* xc = centered(x, s.c.data());
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    const float* xs = gather(g, xc, s.g.data());
    const float n = std::sqrt(canonical_dot(xs, xs, size_t(g.dim)));
    if (!std::isfinite(n))
      return detail::concat("encode: vector ", i, " has a norm too large for float32");
    if (spec.norm_format == NormFormat::f16 && !std::isfinite(half_to_float(float_to_half(n))))
      return detail::concat("encode: vector ", i, groups.size() > 1 ? " (channel group " : "",
                            groups.size() > 1 ? std::to_string(gi) + ")" : std::string(),
                            " has norm ", n, ", above the float16 norm format's maximum ",
                            kHalfMax, "; use the f32 norm format");
  }
  return {};
}

void Codec::Impl::encode_row(const float* x, uint8_t* rec, Scratch& s) const {
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    const auto& t = tables[gi];
    const size_t d = size_t(g.dim);
    const float* xs = gather(g, x, s.g.data());
    const float n = std::sqrt(canonical_dot(xs, xs, d));
    float* y = s.w.data();
    t.rotation.forward_unscaled(xs, y);
    const float inv = n > 0 ? t.rotation.gain() / n : 0.0f;
    for (size_t j = 0; j < d; ++j) y[j] *= inv;
    if (g.mse_bits > 0) {
      dispatch_bits(g.mse_bits, [&](auto b) {
        constexpr int B = decltype(b)::value;
        quantize<B>(y, g.dim, t.codebook->boundaries_f32().data(), s.idx.data());
        pack_codes<B>(s.idx.data(), d, rec + g.codes_offset);
      });
    }
    if (g.qjl) {
      float* r = s.r.data();
      for (size_t j = 0; j < d; ++j)
        r[j] = g.mse_bits > 0 ? y[j] - t.codebook->centroids_f32()[s.idx[j]] : y[j];
      const float gamma = n > 0 ? std::sqrt(canonical_dot(r, r, d)) : 0.0f;
      uint8_t* signs = rec + g.signs_offset;
      std::memset(signs, 0, (d + 7) / 8);
      for (size_t i = 0; i < d; ++i)
        if (canonical_dot(&t.s[i * d], r, d) >= 0.0f) signs[i / 8] |= uint8_t(1u << (i % 8));
      store_scalar(spec.norm_format, gamma, rec + g.gamma_offset);
    }
    store_scalar(spec.norm_format, n, rec + g.norm_offset);
  }
}

void Codec::Impl::decode_row(const uint8_t* rec, float* out, Scratch& s) const {
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& g = groups[gi];
    const auto& t = tables[gi];
    const size_t d = size_t(g.dim);
    float* v = s.w.data();
    if (g.mse_bits > 0) {
      unpack_codes(g.mse_bits, rec + g.codes_offset, d, s.idx.data());
      const float* c = t.codebook->centroids_f32().data();
      for (size_t j = 0; j < d; ++j) v[j] = c[s.idx[j]];
    } else {
      std::fill(v, v + d, 0.0f);
    }
    if (g.qjl) {
      const float gamma = load_scalar(spec.norm_format, rec + g.gamma_offset);
      float* z = s.r.data();
      const uint8_t* signs = rec + g.signs_offset;
      for (size_t i = 0; i < d; ++i) z[i] = (signs[i / 8] >> (i % 8)) & 1u ? 1.0f : -1.0f;
      const float f = t.qjl_factor * gamma;
      for (size_t j = 0; j < d; ++j) v[j] += f * canonical_dot(&t.s_transpose[j * d], z, d);
    }
    const float n = load_scalar(spec.norm_format, rec + g.norm_offset);
    float* dst = groups.size() == 1 ? out : s.g.data();
    t.rotation.inverse(v, dst);
    for (size_t j = 0; j < d; ++j) dst[j] *= n;
    if (groups.size() > 1)
      for (size_t j = 0; j < d; ++j) out[g.channels[j]] = dst[j];
  }
  if (!spec.offset.empty())
    for (int j = 0; j < spec.dim; ++j) out[j] += spec.offset[size_t(j)];
}

CodecSpec Codec::Impl::calibrated(const void* x, ScalarType t, size_t n) const {
  TQKV_CHECK(n > 0, "calibrated_spec: the batch is empty");
  const int d = spec.dim;
  std::vector<float> row(static_cast<size_t>(d)), buf(static_cast<size_t>(d)), offset;
  if (spec.center && spec.offset.empty()) {
    std::vector<double> sum(static_cast<size_t>(d), 0.0);
    for (size_t i = 0; i < n; ++i) {
      row_to_float(x, t, i, d, row.data());
      for (int j = 0; j < d; ++j) sum[size_t(j)] += double(row[size_t(j)]);
    }
    offset.resize(size_t(d));
    for (int j = 0; j < d; ++j) offset[size_t(j)] = float(sum[size_t(j)] / double(n));
  }
  std::vector<double> energy;
  if (fractional && spec.outlier_channels.empty()) {
    const std::vector<float>& mu = spec.offset.empty() ? offset : spec.offset;
    energy.assign(static_cast<size_t>(d), 0.0);
    for (size_t i = 0; i < n; ++i) {
      row_to_float(x, t, i, d, row.data());
      const float* xc = centered(row.data(), mu, buf.data());
      for (int j = 0; j < d; ++j) energy[size_t(j)] += double(xc[j]) * xc[j];
    }
  }
  return from_statistics(offset, energy);
}

CodecSpec Codec::Impl::from_statistics(std::span<const float> offset,
                                       std::span<const double> energy) const {
  const int d = spec.dim;
  CodecSpec out = spec;
  if (spec.center && spec.offset.empty()) {
    TQKV_CHECK(offset.size() == size_t(d), "calibrated_spec: ", offset.size(),
               " offsets for a codec of dim ", d);
    out.offset.assign(offset.begin(), offset.end());
  }
  if (fractional && spec.outlier_channels.empty()) {
    TQKV_CHECK(energy.size() == size_t(d), "calibrated_spec: ", energy.size(),
               " channel energies for a codec of dim ", d);
    // The channels of largest mean square after centering.
    std::vector<int> order(static_cast<size_t>(d));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return energy[size_t(a)] > energy[size_t(b)]; });
    out.outlier_channels.assign(order.begin(), order.begin() + groups[0].dim);
    std::sort(out.outlier_channels.begin(), out.outlier_channels.end());
  }
  return out;
}

void Codec::Impl::set_channels(std::vector<int> outliers) {
  const int d = spec.dim;
  if (!fractional) {
    TQKV_CHECK(outliers.empty(), "codec: outlier_channels given but bits (", spec.bits,
               ") is an integer width");
    groups[0].channels.resize(size_t(d));
    std::iota(groups[0].channels.begin(), groups[0].channels.end(), 0);
    return;
  }
  TQKV_CHECK(int(outliers.size()) == groups[0].dim, "codec: ", spec.bits, " bits at dim ", d,
             " needs ", groups[0].dim, " outlier channels, got ", outliers.size());
  std::vector<char> is_outlier(static_cast<size_t>(d), 0);
  for (int c : outliers) {
    TQKV_CHECK(c >= 0 && c < d, "codec: outlier channel ", c, " is outside 0..", d - 1);
    TQKV_CHECK(!is_outlier[size_t(c)], "codec: outlier channel ", c, " is listed twice");
    is_outlier[size_t(c)] = 1;
  }
  groups[0].channels.clear();
  groups[1].channels.clear();
  for (int c = 0; c < d; ++c) groups[is_outlier[size_t(c)] ? 0 : 1].channels.push_back(c);
  spec.outlier_channels = groups[0].channels;
}

void Codec::Impl::install(const CodecSpec& chosen) {
  spec.offset = chosen.offset;
  if (fractional) set_channels(chosen.outlier_channels);
  ready.store(true, std::memory_order_release);
}

Codec::Codec(const CodecSpec& spec_in) : impl_(std::make_shared<Impl>()) {
  auto& im = *impl_;
  im.spec = spec_in;
  const CodecSpec& spec = im.spec;
  const int d = spec.dim;
  TQKV_CHECK(d >= 2, "codec: dimension must be >= 2, got ", d);
  TQKV_CHECK(d <= 65536, "codec: dimension ", d, " is larger than the supported 65536");
  const bool prod = spec.kind == CodecKind::prod;
  TQKV_CHECK(spec.kind == CodecKind::mse || prod, "codec: unknown codec kind");
  TQKV_CHECK(spec.norm_format == NormFormat::f16 || spec.norm_format == NormFormat::f32,
             "codec: unknown norm format");
  TQKV_CHECK(int(spec.rotation) <= 2, "codec: unknown rotation");
  const double max_bits = prod ? 9 : 8;
  TQKV_CHECK(std::isfinite(spec.bits) && spec.bits >= 1 && spec.bits <= max_bits, "codec: ",
             to_string(spec.kind), " bits must be in 1..", max_bits, ", got ", spec.bits);

  // Integer or fractional split.
  const int low = int(std::floor(spec.bits));
  const double frac = spec.bits - low;
  std::vector<std::pair<int, int>> group_dims;  // (dim, bits), outlier group first
  if (frac == 0) {
    group_dims.push_back({d, low});
  } else {
    const double hi_channels = frac * d;
    const int n_hi = int(std::lround(hi_channels));
    TQKV_CHECK(std::abs(hi_channels - n_hi) < 1e-9 && n_hi >= 2 && d - n_hi >= 2, "codec: ",
               spec.bits, " bits at dim ", d, " would put ", hi_channels,
               " channels at the higher width; fractional bits need a whole number of channels, "
               "at least 2 in each group (e.g. 2.5 or 3.5 at dim 128)");
    group_dims.push_back({n_hi, low + 1});
    group_dims.push_back({d - n_hi, low});
    im.fractional = true;
  }

  size_t offset = 0;
  for (size_t gi = 0; gi < group_dims.size(); ++gi) {
    ChannelGroup g;
    g.dim = group_dims[gi].first;
    g.bits = group_dims[gi].second;
    g.mse_bits = prod ? g.bits - 1 : g.bits;
    g.qjl = prod;
    g.substream = uint32_t(gi);
    g.offset = offset;
    g.codes_offset = offset;
    offset += packed_bytes(g.mse_bits, size_t(g.dim));
    g.signs_offset = offset;
    if (g.qjl) offset += (size_t(g.dim) + 7) / 8;
    g.norm_offset = offset;
    offset += norm_bytes(spec.norm_format);
    g.gamma_offset = offset;
    if (g.qjl) offset += norm_bytes(spec.norm_format);
    g.bytes = offset - g.offset;

    RotationKind kind;
    if (spec.rotation == RotationChoice::automatic)
      kind = is_power_of_two(g.dim) ? RotationKind::hadamard : RotationKind::dense;
    else
      kind = spec.rotation == RotationChoice::hadamard ? RotationKind::hadamard
                                                        : RotationKind::dense;
    TQKV_CHECK(kind == RotationKind::dense || is_power_of_two(g.dim), "codec: the Hadamard ",
               "rotation needs a power-of-two dimension, but ",
               group_dims.size() > 1 ? "a channel group of this split has " : "dim is ", g.dim,
               "; use --rotation dense or auto");
    // Dense rotations and QJL matrices cost d² floats and O(d³) set-up: bounded, so that a
    // file naming a huge codec is refused instead of exhausting memory.
    TQKV_CHECK((kind == RotationKind::hadamard && !g.qjl) || g.dim <= kMaxDenseDim, "codec: ",
               kind == RotationKind::dense ? "the dense rotation" : "the prod codec's QJL matrix",
               " supports dimensions up to ", kMaxDenseDim, ", got ", g.dim);
    GroupTables t{Rotation(kind, g.dim, spec.seed, g.substream), nullptr, {}, {}, 0};
    if (g.mse_bits > 0) t.codebook = Codebook::get(g.dim, g.mse_bits);
    if (g.qjl) {
      const size_t n = size_t(g.dim);
      std::vector<double> normals(n * n);
      random::fill_normals({spec.seed, random::Stream::qjl_projection, g.substream}, n * n,
                           normals.data());
      t.s.resize(n * n);
      t.s_transpose.resize(n * n);
      for (size_t r = 0; r < n; ++r)
        for (size_t c = 0; c < n; ++c) {
          t.s[r * n + c] = float(normals[r * n + c]);
          t.s_transpose[c * n + r] = float(normals[r * n + c]);
        }
      t.qjl_factor = float(kSqrtHalfPi / double(g.dim));
    }
    im.groups.push_back(std::move(g));
    im.tables.push_back(std::move(t));
  }
  im.record_bytes = offset;

  TQKV_CHECK(spec.center || spec.offset.empty(), "codec: an offset is given but center is off");
  TQKV_CHECK(spec.offset.empty() || spec.offset.size() == size_t(d), "codec: the offset has ",
             spec.offset.size(), " elements for dim ", d);
  for (size_t j = 0; j < spec.offset.size(); ++j)
    TQKV_CHECK(std::isfinite(spec.offset[j]), "codec: offset[", j, "] is not finite (",
               spec.offset[j], ")");
  im.needs_channels = im.fractional && spec.outlier_channels.empty();
  if (!im.needs_channels) im.set_channels(spec.outlier_channels);
  if (!im.needs_channels && (!spec.center || !spec.offset.empty())) im.ready.store(true);
}

CodecSpec Codec::spec() const {
  std::lock_guard lock(impl_->calibrate_mutex);
  return impl_->spec;
}
int Codec::dim() const { return impl_->spec.dim; }
double Codec::bits() const { return impl_->spec.bits; }
CodecKind Codec::kind() const { return impl_->spec.kind; }
size_t Codec::record_bytes() const { return impl_->record_bytes; }
bool Codec::ready() const { return impl_->ready.load(std::memory_order_acquire); }
const std::vector<ChannelGroup>& Codec::groups() const { return impl_->groups; }
const Rotation& Codec::rotation(size_t g) const { return impl_->tables.at(g).rotation; }
const Codebook* Codec::codebook(size_t g) const { return impl_->tables.at(g).codebook.get(); }
const std::vector<float>& Codec::qjl_matrix(size_t g) const { return impl_->tables.at(g).s; }
const std::vector<float>& Codec::offset() const {
  impl_->require_ready("offset");
  return impl_->spec.offset;
}

CodecSpec Codec::calibrated_spec(const float* x, size_t n) const {
  TQKV_CHECK(x != nullptr || n == 0, "calibrated_spec: null input");
  std::lock_guard lock(impl_->calibrate_mutex);
  return impl_->calibrated(x, ScalarType::f32, n);
}

CodecSpec Codec::calibrated_spec(std::span<const float> offset,
                                 std::span<const double> energy) const {
  std::lock_guard lock(impl_->calibrate_mutex);
  return impl_->from_statistics(offset, energy);
}

void Codec::encode(const void* x, ScalarType type, size_t n, uint8_t* records) const {
  auto& im = *impl_;
  if (n == 0) return;
  TQKV_CHECK(x != nullptr && records != nullptr, "encode: null input or output pointer");
  const int d = im.spec.dim;
  const long long count = static_cast<long long>(n);
  [[maybe_unused]] const int threads = n >= kParallelMin ? thread_count() : 1;

  // Validate everything before writing anything. An uncalibrated fractional codec first checks
  // the elements alone (outlier channels are chosen only from valid data), then the norms.
  auto first_invalid = [&](bool elements_only) {
    long long first_bad = count;
#pragma omp parallel num_threads(threads) reduction(min : first_bad)
    {
      Scratch s(d);
#pragma omp for schedule(static)
      for (long long i = 0; i < count; ++i) {
        if (i >= first_bad) continue;
        row_to_float(x, type, size_t(i), d, s.x.data());
        bool bad = false;
        if (elements_only) {
          bad = !all_finite(s.x.data(), d);
        } else {
          bad = !im.check_row(s.x.data(), size_t(i), s).empty();
        }
        if (bad) first_bad = i;
      }
    }
    if (first_bad < count) {
      Scratch s(d);
      row_to_float(x, type, size_t(first_bad), d, s.x.data());
      throw Error(im.check_row(s.x.data(), size_t(first_bad), s));
    }
  };
  if (!im.ready.load(std::memory_order_acquire)) {
    // What this codec lacks comes from this batch, and is kept only if the batch is accepted:
    // a codec made with the choice validates and encodes it (throwing before writing anything),
    // then the choice is installed. Under the lock, so that a concurrent first batch waits and
    // then uses this choice.
    first_invalid(true);
    std::lock_guard lock(im.calibrate_mutex);
    if (!im.ready.load(std::memory_order_acquire)) {
      const Codec chosen(im.calibrated(x, type, n));
      chosen.encode(x, type, n, records);
      im.install(chosen.impl_->spec);
      return;
    }
  }
  first_invalid(false);

#pragma omp parallel num_threads(threads)
  {
    Scratch s(d);
#pragma omp for schedule(static)
    for (long long i = 0; i < count; ++i) {
      row_to_float(x, type, size_t(i), d, s.x.data());
      im.encode_row(im.centered(s.x.data(), s.c.data()), records + size_t(i) * im.record_bytes, s);
    }
  }
}

void Codec::decode(const uint8_t* records, size_t n, float* out) const {
  auto& im = *impl_;
  if (n == 0) return;
  im.require_ready("decode");
  TQKV_CHECK(records != nullptr && out != nullptr, "decode: null input or output pointer");
  const int d = im.spec.dim;
  const long long count = static_cast<long long>(n);
  [[maybe_unused]] const int threads = n >= kParallelMin ? thread_count() : 1;
#pragma omp parallel num_threads(threads)
  {
    Scratch s(d);
#pragma omp for schedule(static)
    for (long long i = 0; i < count; ++i)
      im.decode_row(records + size_t(i) * im.record_bytes, out + size_t(i) * size_t(d), s);
  }
}

void Codec::inner_products(const float* q, const uint8_t* records, size_t n, float* out) const {
  auto& im = *impl_;
  if (n == 0) return;
  im.require_ready("inner_products");
  TQKV_CHECK(q != nullptr && records != nullptr && out != nullptr,
             "inner_products: null pointer");
  const int d = im.spec.dim;
  for (int j = 0; j < d; ++j)
    TQKV_CHECK(std::isfinite(q[j]), "inner_products: the query has a non-finite element at ", j);

  // Rotate (and project) the query once per group: q' = Π q_g, q_s = S q'.
  struct Prepared {
    std::vector<float> rotated, projected;  // Π q_g, and S Π q_g for prod
  };
  std::vector<Prepared> prep(im.groups.size());
  std::vector<float> buf(static_cast<size_t>(d));
  for (size_t gi = 0; gi < im.groups.size(); ++gi) {
    const auto& g = im.groups[gi];
    const auto& t = im.tables[gi];
    const size_t gd = size_t(g.dim);
    const float* qs = im.gather(g, q, buf.data());
    prep[gi].rotated.resize(gd);
    t.rotation.forward(qs, prep[gi].rotated.data());
    if (g.qjl) {
      prep[gi].projected.resize(gd);
      for (size_t i = 0; i < gd; ++i)
        prep[gi].projected[i] = canonical_dot(&t.s[i * gd], prep[gi].rotated.data(), gd);
    }
  }
  // ⟨q, x̃⟩ = ⟨q, μ⟩ + ⟨q, x̃ − μ⟩ for a centering codec.
  const float shift = im.spec.offset.empty() ? 0.0f : canonical_dot(q, im.spec.offset.data(), size_t(d));
  const long long count = static_cast<long long>(n);
  [[maybe_unused]] const int threads = n >= kParallelMin ? thread_count() : 1;
#pragma omp parallel num_threads(threads)
  {
    Scratch s(d);
#pragma omp for schedule(static)
    for (long long i = 0; i < count; ++i) {
      const uint8_t* rec = records + size_t(i) * im.record_bytes;
      float total = shift;
      for (size_t gi = 0; gi < im.groups.size(); ++gi) {
        const auto& g = im.groups[gi];
        const auto& t = im.tables[gi];
        const auto& p = prep[gi];
        const size_t gd = size_t(g.dim);
        float dot = 0;
        if (g.mse_bits > 0) {
          unpack_codes(g.mse_bits, rec + g.codes_offset, gd, s.idx.data());
          const float* c = t.codebook->centroids_f32().data();
          for (size_t j = 0; j < gd; ++j) s.w[j] = c[s.idx[j]];
          dot = canonical_dot(p.rotated.data(), s.w.data(), gd);
        }
        if (g.qjl) {
          const uint8_t* signs = rec + g.signs_offset;
          for (size_t j = 0; j < gd; ++j) s.r[j] = (signs[j / 8] >> (j % 8)) & 1u ? 1.0f : -1.0f;
          const float gamma = load_scalar(im.spec.norm_format, rec + g.gamma_offset);
          dot += t.qjl_factor * gamma * canonical_dot(p.projected.data(), s.r.data(), gd);
        }
        total += load_scalar(im.spec.norm_format, rec + g.norm_offset) * dot;
      }
      out[i] = total;
    }
  }
}

}  // namespace tqkv
