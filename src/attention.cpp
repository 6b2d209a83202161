// The CPU attention engine: one loop structure (work items over sequence × KV head × query tile ×
// token split, pages of tokens with an online softmax, a merge of split states, one finalize per
// query row) shared by two sources of keys and values: the compressed cache and plain float32
// arrays. The sources differ only in how a block's scores and value sums are computed and in
// what a query row looks like before and after (rotated space vs original space).
#include "tqkv/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_problem.hpp"
#include "cpu/kernels.hpp"
#include "tqkv/error.hpp"
#include "tqkv/half.hpp"
#include "tqkv/softmax_state.hpp"

namespace tqkv {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kSqrtHalfPi = 1.2533141373155003f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr size_t kTileTokens = 16;   // query tokens per prefill tile
constexpr size_t kMinSplitTokens = 256;  // a split shorter than this costs more than it gains
// Above this many query rows a block's codes are expanded to a float tile once and the float
// kernels run on it, instead of unpacking the codes once per 4 rows.
constexpr int kExpandRows = 8;

using Problem = detail::AttentionProblem;
using detail::make_problem;
using detail::total_rows;

struct Unit {  // one (sequence, KV head, query tile): a set of query rows
  int b = 0, h = 0;
  size_t i0 = 0, i1 = 0;  // query tokens [i0, i1) of the sequence
  size_t lo = 0, hi = 0;  // tokens any of its rows can see
  int rows = 0;
  size_t prepared_offset = 0;
  int first_item = 0, items = 0;
};

struct Item {  // a token range of a unit
  int unit = 0;
  size_t lo = 0, hi = 0;
  size_t state_offset = 0;
};

void check_problem(const Problem& p, const float* q, size_t query_rows, float* out) {
  detail::check_shape(p);
  if (query_rows == 0) return;
  TQKV_CHECK(q != nullptr && out != nullptr, "attend: null query or output pointer");
  const size_t n = query_rows * size_t(p.q_heads) * size_t(p.dim);
  for (size_t i = 0; i < n; ++i)
    TQKV_CHECK(std::isfinite(q[i]), "attend: the query has a non-finite element (", q[i],
               ") at query token ", i / (size_t(p.q_heads) * size_t(p.dim)), ", head ",
               (i / size_t(p.dim)) % size_t(p.q_heads), ", index ", i % size_t(p.dim));
}

// --- sources -------------------------------------------------------------------------------------

// Keys and values from the compressed cache, one layer.
class CompressedSource {
 public:
  CompressedSource(const KVCache& cache, int layer, std::span<const SequenceId> seqs)
      : cache_(cache), layer_(layer), seqs_(seqs), P_(cache.config().page_tokens),
        floats_(cpu::float_kernels()) {
    for (int bits = 1; bits <= 8; ++bits) codes_[bits] = &cpu::code_kernels(bits);
    for (const auto& g : cache.key_codec(layer, 0).groups()) prep_dim_ += g.dim * (g.qjl ? 2 : 1);
    for (const auto& g : cache.value_codec(layer, 0).groups()) acc_dim_ += g.dim * (g.qjl ? 2 : 1);
  }
  int block_tokens() const { return P_; }
  int prep_dim() const { return prep_dim_; }
  int acc_dim() const { return acc_dim_; }

  struct Scratch {
    std::vector<float> tmp, tmp2, norms, gammas, tile, vec, vec2;
    Scratch(int rows, int P, int d)
        : tmp(size_t(rows) * size_t(P)), tmp2(tmp.size()), norms(size_t(P)), gammas(size_t(P)),
          tile(size_t(P) * size_t(d)), vec(size_t(d)), vec2(size_t(d)) {}
  };
  Scratch scratch(int rows) const { return Scratch(rows, P_, cache_.config().head_dim); }

  // prepared = per key group: [rows][d_g] rotated rows, then per prod group [rows][d_g] S q'.
  void prepare(int h, const float* q_rows, int rows, float scale, float* prepared,
               Scratch& s) const {
    const Codec& codec = cache_.key_codec(layer_, h);
    const auto& groups = codec.groups();
    float* at = prepared;
    std::vector<float*> rotated(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      const int dg = groups[g].dim;
      rotated[g] = at;
      for (int r = 0; r < rows; ++r) {
        const float* x = q_rows + size_t(r) * size_t(cache_.config().head_dim);
        for (int j = 0; j < dg; ++j) s.vec[size_t(j)] = scale * x[groups[g].channels[size_t(j)]];
        codec.rotation(g).forward(s.vec.data(), at + size_t(r) * size_t(dg));
      }
      at += size_t(rows) * size_t(dg);
    }
    for (size_t g = 0; g < groups.size(); ++g) {
      if (!groups[g].qjl) continue;
      const size_t dg = size_t(groups[g].dim);
      const float* S = codec.qjl_matrix(g).data();
      for (int r = 0; r < rows; ++r) {
        const float* x = rotated[g] + size_t(r) * dg;
        for (size_t i = 0; i < dg; ++i) {
          float sum = 0;
          for (size_t j = 0; j < dg; ++j) sum += S[i * dg + j] * x[j];
          at[size_t(r) * dg + i] = sum;
        }
      }
      at += size_t(rows) * dg;
    }
  }

  // scores[r * P + t] for tokens [t0, t0 + n) of one page.
  void scores(int b, int h, size_t t0, int n, const float* prepared, int rows, float* scores,
              Scratch& s) const {
    const Codec& codec = cache_.key_codec(layer_, h);
    const auto& groups = codec.groups();
    const BlockLayout& layout = cache_.key_layout();
    const uint8_t* block = page_block(b, h, t0, false);
    const size_t slot = t0 % size_t(P_);
    const float* rotated = prepared;
    const float* projected = prepared;
    for (const auto& g : groups) projected += size_t(rows) * size_t(g.dim);
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const auto& g = groups[gi];
      const auto& sec = layout.groups[gi];
      float* dst = gi == 0 ? scores : s.tmp.data();
      if (g.mse_bits > 0) {
        run_scores(g.mse_bits, run(block, sec.codes, slot, n, g.dim),
                   codec.codebook(gi)->centroids_f32().data(), rotated, rows, dst, s);
      } else {
        for (int r = 0; r < rows; ++r) std::fill_n(dst + size_t(r) * size_t(P_), n, 0.0f);
      }
      load_norms(block, sec.norm, slot, n, s.norms.data());
      if (g.qjl) {
        run_scores(1, run(block, sec.signs, slot, n, g.dim), kSigns, projected, rows,
                   s.tmp2.data(), s);
        load_norms(block, sec.gamma, slot, n, s.gammas.data());
        const float f = kSqrtHalfPi / float(g.dim);
        for (int t = 0; t < n; ++t) s.gammas[size_t(t)] *= f;
        for (int r = 0; r < rows; ++r)
          for (int t = 0; t < n; ++t)
            dst[size_t(r) * size_t(P_) + size_t(t)] +=
                s.gammas[size_t(t)] * s.tmp2[size_t(r) * size_t(P_) + size_t(t)];
        projected += size_t(rows) * size_t(g.dim);
      }
      for (int r = 0; r < rows; ++r) {
        float* row = dst + size_t(r) * size_t(P_);
        float* total = scores + size_t(r) * size_t(P_);
        for (int t = 0; t < n; ++t)
          total[t] = gi == 0 ? row[t] * s.norms[size_t(t)] : total[t] + row[t] * s.norms[size_t(t)];
      }
      rotated += size_t(rows) * size_t(g.dim);
    }
  }

  // acc[r * acc_dim + ...] += Σ_t w[r * P + t] · (value of token t in the rotated space).
  void accumulate(int b, int h, size_t t0, int n, const float* w, int rows, float* acc,
                  Scratch& s) const {
    const Codec& codec = cache_.value_codec(layer_, h);
    const auto& groups = codec.groups();
    const BlockLayout& layout = cache_.value_layout();
    const uint8_t* block = page_block(b, h, t0, true);
    const size_t slot = t0 % size_t(P_);
    float* mse_acc = acc;
    float* qjl_acc = acc;
    for (const auto& g : groups) qjl_acc += g.dim;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const auto& g = groups[gi];
      const auto& sec = layout.groups[gi];
      load_norms(block, sec.norm, slot, n, s.norms.data());
      float* wn = s.tmp.data();
      for (int r = 0; r < rows; ++r)
        for (int t = 0; t < n; ++t)
          wn[size_t(r) * size_t(P_) + size_t(t)] =
              w[size_t(r) * size_t(P_) + size_t(t)] * s.norms[size_t(t)];
      if (g.mse_bits > 0)
        run_accumulate(g.mse_bits, run(block, sec.codes, slot, n, g.dim),
                       codec.codebook(gi)->centroids_f32().data(), wn, rows, mse_acc, s);
      if (g.qjl) {
        load_norms(block, sec.gamma, slot, n, s.gammas.data());
        for (int r = 0; r < rows; ++r)
          for (int t = 0; t < n; ++t) wn[size_t(r) * size_t(P_) + size_t(t)] *= s.gammas[size_t(t)];
        run_accumulate(1, run(block, sec.signs, slot, n, g.dim), kSigns, wn, rows, qjl_acc, s);
        qjl_acc += g.dim;
      }
      mse_acc += g.dim;
    }
  }

  // out = Π_Vᵀ(acc · inv_l) (+ the QJL term), scattered back to the original channels.
  void finalize(int h, const float* acc, float inv_l, float* out, Scratch& s) const {
    const Codec& codec = cache_.value_codec(layer_, h);
    const auto& groups = codec.groups();
    const float* mse_acc = acc;
    const float* qjl_acc = acc;
    for (const auto& g : groups) qjl_acc += g.dim;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const auto& g = groups[gi];
      const size_t dg = size_t(g.dim);
      float* v = s.vec.data();
      for (size_t j = 0; j < dg; ++j) v[j] = mse_acc[j] * inv_l;
      if (g.qjl) {
        const float* S = codec.qjl_matrix(gi).data();
        const float f = kSqrtHalfPi / float(g.dim) * inv_l;
        for (size_t i = 0; i < dg; ++i) {
          const float zi = f * qjl_acc[i];
          for (size_t j = 0; j < dg; ++j) v[j] += S[i * dg + j] * zi;
        }
        qjl_acc += dg;
      }
      codec.rotation(gi).inverse(v, s.vec2.data());
      for (size_t j = 0; j < dg; ++j) out[g.channels[j]] = s.vec2[j];
      mse_acc += dg;
    }
    // Centered values: the output is μ_V + Σ p (v − μ_V), as the weights sum to 1. (Centered
    // keys need nothing: they shift all of a query's scores by ⟨q, μ_K⟩, which softmax ignores.)
    const std::vector<float>& offset = codec.offset();
    for (size_t j = 0; j < offset.size(); ++j) out[j] += offset[j];
  }

 private:
  static constexpr float kSigns[2] = {-1.0f, 1.0f};  // a QJL sign bit as a 1-bit code

  const uint8_t* page_block(int b, int h, size_t t0, bool values) const {
    const uint32_t page = cache_.page_table(seqs_[size_t(b)])[t0 / size_t(P_)];
    return values ? cache_.value_block(layer_, page, h) : cache_.key_block(layer_, page, h);
  }
  static cpu::CodeRun run(const uint8_t* block, const SectionLayout& sec, size_t slot, int n,
                          int dim) {
    return {block + sec.block_offset + slot * sec.bytes, sec.bytes, n, dim};
  }
  void load_norms(const uint8_t* block, const SectionLayout& sec, size_t slot, int n,
                  float* out) const {
    const uint8_t* p = block + sec.block_offset + slot * sec.bytes;
    if (sec.bytes == 2) {
      for (int t = 0; t < n; ++t) {
        uint16_t h;
        std::memcpy(&h, p + size_t(t) * 2, 2);
        out[t] = half_to_float(h);
      }
    } else {
      std::memcpy(out, p, size_t(n) * 4);
    }
  }
  void run_scores(int bits, const cpu::CodeRun& r, const float* table, const float* q, int rows,
                  float* out, Scratch& s) const {
    if (rows > kExpandRows) {
      codes_[bits]->expand(r, table, s.tile.data());
      floats_.scores({s.tile.data(), size_t(r.dim), r.tokens, r.dim}, q, rows, out, size_t(P_));
    } else {
      codes_[bits]->scores(r, table, q, rows, out, size_t(P_));
    }
  }
  void run_accumulate(int bits, const cpu::CodeRun& r, const float* table, const float* w,
                      int rows, float* acc, Scratch& s) const {
    if (rows > kExpandRows) {
      codes_[bits]->expand(r, table, s.tile.data());
      floats_.accumulate({s.tile.data(), size_t(r.dim), r.tokens, r.dim}, w, size_t(P_), rows,
                         acc, size_t(acc_dim_));
    } else {
      codes_[bits]->accumulate(r, table, w, size_t(P_), rows, acc, size_t(acc_dim_));
    }
  }

  const KVCache& cache_;
  int layer_;
  std::span<const SequenceId> seqs_;
  int P_;
  // Kernel tables resolved once per call, not per block.
  const cpu::FloatKernels& floats_;
  const cpu::CodeKernels* codes_[9] = {};
  int prep_dim_ = 0, acc_dim_ = 0;
};

// Keys and values as float32 arrays [H_kv, T, d] per sequence.
class DenseSource {
 public:
  DenseSource(std::span<const DenseKV> seqs, int dim)
      : seqs_(seqs), dim_(dim), floats_(cpu::float_kernels()) {}
  static constexpr int kBlock = 64;
  int block_tokens() const { return kBlock; }
  int prep_dim() const { return dim_; }
  int acc_dim() const { return dim_; }
  struct Scratch {};
  Scratch scratch(int) const { return {}; }

  void prepare(int, const float* q_rows, int rows, float scale, float* prepared, Scratch&) const {
    for (size_t i = 0; i < size_t(rows) * size_t(dim_); ++i) prepared[i] = scale * q_rows[i];
  }
  void scores(int b, int h, size_t t0, int n, const float* prepared, int rows, float* scores,
              Scratch&) const {
    floats_.scores(run(seqs_[size_t(b)].k, b, h, t0, n), prepared, rows, scores,
                   size_t(kBlock));
  }
  void accumulate(int b, int h, size_t t0, int n, const float* w, int rows, float* acc,
                  Scratch&) const {
    floats_.accumulate(run(seqs_[size_t(b)].v, b, h, t0, n), w, size_t(kBlock), rows, acc,
                       size_t(dim_));
  }
  void finalize(int, const float* acc, float inv_l, float* out, Scratch&) const {
    for (int j = 0; j < dim_; ++j) out[j] = acc[j] * inv_l;
  }

 private:
  cpu::FloatRun run(const float* base, int b, int h, size_t t0, int n) const {
    const size_t T = seqs_[size_t(b)].tokens;
    return {base + (size_t(h) * T + t0) * size_t(dim_), size_t(dim_), n, dim_};
  }
  std::span<const DenseKV> seqs_;
  int dim_;
  const cpu::FloatKernels& floats_;
};

// --- the engine ----------------------------------------------------------------------------------

// Outputs go to `out` ([rows][H_q][d]), or with `states` set to partial states there instead
// ([rows][H_q][4 + d], attend_partial's layout).
template <class Source>
void run_engine(const Problem& p, const Source& src, const float* q, float* out, int splits,
                float* states = nullptr) {
  const size_t R = size_t(p.group), d = size_t(p.dim), P = size_t(src.block_tokens());
  // Units and their token splits.
  std::vector<Unit> units;
  size_t prepared_size = 0;
  for (size_t b = 0; b < p.seqs.size(); ++b) {
    const auto& s = p.seqs[b];
    for (int h = 0; h < p.kv_heads; ++h)
      for (size_t i0 = 0; i0 < s.queries; i0 += kTileTokens) {
        Unit u;
        u.b = int(b);
        u.h = h;
        u.i0 = i0;
        u.i1 = std::min(s.queries, i0 + kTileTokens);
        const size_t first_pos = s.tokens - s.queries + u.i0, last_pos = s.tokens - s.queries + u.i1 - 1;
        u.lo = p.window && first_pos + 1 > p.window ? first_pos + 1 - p.window : 0;
        u.hi = last_pos + 1;
        u.rows = int(R * (u.i1 - u.i0));
        u.prepared_offset = prepared_size;
        prepared_size += size_t(u.rows) * size_t(src.prep_dim());
        units.push_back(u);
      }
  }
  if (units.empty()) return;
  const int threads = num_threads();
  int want = splits;
  if (want <= 0) want = int((2 * size_t(threads) + units.size() - 1) / units.size());
  std::vector<Item> items;
  const size_t acc_dim = size_t(src.acc_dim());
  size_t state_size = 0;
  for (size_t ui = 0; ui < units.size(); ++ui) {
    Unit& u = units[ui];
    const size_t first_block = u.lo / P, end_block = (u.hi + P - 1) / P;
    size_t n_split = size_t(std::max(want, 1));
    if (splits <= 0)
      n_split = std::min(n_split, std::max<size_t>(1, (u.hi - u.lo) / kMinSplitTokens));
    n_split = std::min(n_split, end_block - first_block);
    u.first_item = int(items.size());
    u.items = int(n_split);
    for (size_t k = 0; k < n_split; ++k) {
      // Split at block boundaries, as evenly as the blocks allow.
      const size_t b0 = first_block + (end_block - first_block) * k / n_split;
      const size_t b1 = first_block + (end_block - first_block) * (k + 1) / n_split;
      Item it;
      it.unit = int(ui);
      it.lo = std::max(u.lo, b0 * P);
      it.hi = std::min(u.hi, b1 * P);
      it.state_offset = state_size;
      state_size += size_t(u.rows) * (2 + acc_dim);
      items.push_back(it);
    }
  }
  std::vector<float> prepared(prepared_size), state(state_size);
  const int max_rows = int(R * kTileTokens);

  // 1. Rotate / scale each unit's query rows once.
  const long long n_units = (long long)units.size();
#pragma omp parallel num_threads(threads)
  {
    auto scratch = src.scratch(max_rows);
    std::vector<float> rows(size_t(max_rows) * d);
#pragma omp for schedule(dynamic, 1)
    for (long long ui = 0; ui < n_units; ++ui) {
      const Unit& u = units[size_t(ui)];
      const auto& s = p.seqs[size_t(u.b)];
      // Row (i, r) is query token i, query head h·R + r.
      for (size_t i = u.i0; i < u.i1; ++i)
        for (size_t r = 0; r < R; ++r)
          std::memcpy(&rows[((i - u.i0) * R + r) * d],
                      q + ((s.first_query_row + i) * size_t(p.q_heads) + size_t(u.h) * R + r) * d,
                      d * 4);
      src.prepare(u.h, rows.data(), u.rows, p.scale, &prepared[u.prepared_offset], scratch);
    }
  }

  // 2. Each item: online softmax over its blocks.
  const long long n_items = (long long)items.size();
#pragma omp parallel num_threads(threads)
  {
    auto scratch = src.scratch(max_rows);
    std::vector<float> sc(size_t(max_rows) * P), w(size_t(max_rows) * P);
    const auto& fk = cpu::float_kernels();
#pragma omp for schedule(dynamic, 1)
    for (long long ii = 0; ii < n_items; ++ii) {
      const Item& it = items[size_t(ii)];
      const Unit& u = units[size_t(it.unit)];
      const auto& s = p.seqs[size_t(u.b)];
      const size_t rows = size_t(u.rows);
      float* m = &state[it.state_offset];
      float* l = m + rows;
      float* acc = l + rows;
      for (size_t r = 0; r < rows; ++r) SoftmaxState{m + r, l + r, acc + r * acc_dim, int(acc_dim)}.reset();
      const float* prep = &prepared[u.prepared_offset];
      const size_t pos0 = s.tokens - s.queries + u.i0;  // position of the tile's first query
      for (size_t t0 = it.lo; t0 < it.hi;) {
        const size_t t1 = std::min(it.hi, (t0 / P + 1) * P);
        const int n = int(t1 - t0);
        src.scores(u.b, u.h, t0, n, prep, int(rows), sc.data(), scratch);
        // Causal and window masks, where some row cannot see the whole block.
        const size_t last_pos = pos0 + (u.i1 - u.i0) - 1;
        const bool all_visible =
            t1 - 1 <= pos0 && (p.window == 0 || t0 + p.window > last_pos);
        if (!all_visible)
          for (size_t r = 0; r < rows; ++r) {
            const size_t pos = pos0 + r / R;
            for (size_t t = t0; t < t1; ++t)
              if (t > pos || (p.window && t + p.window <= pos)) sc[r * P + (t - t0)] = kNegInf;
          }
        for (size_t r = 0; r < rows; ++r) {
          float* srow = &sc[r * P];
          float* wrow = &w[r * P];
          float mb = kNegInf;
          for (int t = 0; t < n; ++t) mb = std::max(mb, srow[t]);
          const float m_new = std::max(m[r], mb);
          if (m_new == kNegInf) {
            std::fill_n(wrow, n, 0.0f);
            continue;
          }
          if (m[r] != m_new) {
            const float alpha = std::exp(m[r] - m_new);  // 0 when m[r] = −inf
            l[r] *= alpha;
            float* a = acc + r * acc_dim;
            for (size_t j = 0; j < acc_dim; ++j) a[j] *= alpha;
            m[r] = m_new;
          }
          for (int t = 0; t < n; ++t) wrow[t] = srow[t] - m_new;
          fk.exp(wrow, n);
          float sum = 0;
          for (int t = 0; t < n; ++t) sum += wrow[t];
          l[r] += sum;
        }
        src.accumulate(u.b, u.h, t0, n, w.data(), int(rows), acc, scratch);
        t0 = t1;
      }
    }
  }

  // 3. Merge each unit's splits into its first, then finalize every row.
#pragma omp parallel num_threads(threads)
  {
    auto scratch = src.scratch(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (long long ui = 0; ui < n_units; ++ui) {
      const Unit& u = units[size_t(ui)];
      const auto& s = p.seqs[size_t(u.b)];
      const size_t rows = size_t(u.rows);
      auto row_state = [&](int item, size_t r) {
        float* m = &state[items[size_t(item)].state_offset];
        return SoftmaxState{m + r, m + rows + r, m + 2 * rows + r * acc_dim, int(acc_dim)};
      };
      for (size_t r = 0; r < rows; ++r) {
        const SoftmaxState total = row_state(u.first_item, r);
        for (int k = 1; k < u.items; ++k) merge(total, row_state(u.first_item + k, r));
        const size_t i = u.i0 + r / R, head = size_t(u.h) * R + r % R;
        const size_t row = (s.first_query_row + i) * size_t(p.q_heads) + head;
        TQKV_ASSERT(*total.l > 0);  // every query sees at least its own token
        if (states) {
          float* st = states + row * (4 + d);
          st[0] = *total.m * kLog2e;
          st[1] = *total.l;
          st[2] = st[3] = 0.0f;
          src.finalize(u.h, total.acc, 1.0f / *total.l, st + 4, scratch);
          for (size_t j = 0; j < d; ++j) st[4 + j] *= *total.l;
        } else {
          src.finalize(u.h, total.acc, 1.0f / *total.l, out + row * d, scratch);
        }
      }
    }
  }
}

}  // namespace

namespace detail {

AttentionProblem make_problem(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                              std::span<const size_t> query_tokens, int q_heads,
                              const AttentionOptions& options) {
  const auto& c = cache.config();
  TQKV_CHECK(layer >= 0 && layer < c.layers, "attend: layer ", layer, " is outside 0..",
             c.layers - 1);
  TQKV_CHECK(seqs.size() == query_tokens.size(), "attend: ", seqs.size(),
             " sequences but ", query_tokens.size(), " query token counts");
  AttentionProblem p;
  p.q_heads = q_heads;
  p.kv_heads = c.kv_heads;
  p.group = q_heads / c.kv_heads;
  p.dim = c.head_dim;
  p.scale = options.scale == 0.0f ? 1.0f / std::sqrt(float(c.head_dim)) : options.scale;
  p.window = options.window;
  size_t row = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    TQKV_CHECK(cache.contains(seqs[b]), "attend: sequence ", seqs[b], " does not exist");
    const size_t T = cache.length(seqs[b], layer);
    TQKV_CHECK(query_tokens[b] <= T, "attend: sequence ", seqs[b], " has ", T,
               " tokens at layer ", layer, ", fewer than its ", query_tokens[b],
               " query tokens (append the new tokens' keys and values first)");
    p.seqs.push_back({T, query_tokens[b], row});
    row += query_tokens[b];
  }
  for (int h = 0; h < c.kv_heads && row > 0; ++h)
    TQKV_CHECK(cache.key_codec(layer, h).ready() && cache.value_codec(layer, h).ready(),
               "attend: layer ", layer, " has no stored tokens to attend to");
  return p;
}

void check_shape(const AttentionProblem& p) {
  TQKV_CHECK(p.q_heads >= 1, "attend: q_heads must be positive, got ", p.q_heads);
  TQKV_CHECK(p.q_heads % p.kv_heads == 0, "attend: q_heads (", p.q_heads,
             ") must be a multiple of the cache's kv_heads (", p.kv_heads, ")");
  TQKV_CHECK(std::isfinite(p.scale) && p.scale > 0, "attend: the softmax scale must be a ",
             "positive finite number, got ", p.scale);
}

size_t total_rows(const AttentionProblem& p) {
  size_t n = 0;
  for (const auto& s : p.seqs) n += s.queries;
  return n;
}

}  // namespace detail

void attend(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
            std::span<const size_t> query_tokens, const float* q, int q_heads, float* out,
            const AttentionOptions& options) {
  TQKV_CHECK(!cache.device().is_cuda(), "attend: this cache lives on ", to_string(cache.device()),
             "; GPU attention takes a GpuWorkspace and a stream");
  const Problem p = make_problem(cache, layer, seqs, query_tokens, q_heads, options);
  check_problem(p, q, total_rows(p), out);
  TQKV_CHECK(options.splits >= 0, "attend: splits must be >= 0, got ", options.splits);
  run_engine(p, CompressedSource(cache, layer, seqs), q, out, options.splits);
}

void attend_decode(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                   const float* q, int q_heads, float* out, const AttentionOptions& options) {
  const std::vector<size_t> ones(seqs.size(), 1);
  attend(cache, layer, seqs, ones, q, q_heads, out, options);
}

namespace detail {

std::vector<SequenceRun> sequence_runs(const KVCache& cache, int layer,
                                       std::span<const SequenceId> seqs, int q_heads,
                                       const AttentionOptions& options) {
  TQKV_CHECK(options.window == 0, "attend_partial: window attention needs the tokens' positions "
             "in the whole sequence, which a share does not know (use head placement)");
  TQKV_CHECK(options.splits >= 0, "attend: splits must be >= 0, got ", options.splits);
  // The layer, the query heads and the scale, also where no sequence has tokens to attend.
  check_shape(make_problem(cache, layer, {}, {}, q_heads, options));
  std::vector<SequenceRun> runs;
  for (size_t b = 0; b < seqs.size(); ++b) {
    TQKV_CHECK(cache.contains(seqs[b]), "attend_partial: sequence ", seqs[b], " does not exist");
    const bool held = cache.length(seqs[b], layer) > 0;
    if (runs.empty() || runs.back().held != held) runs.push_back({b, 0, held});
    ++runs.back().count;
  }
  return runs;
}

}  // namespace detail

void attend_partial(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                    const float* q, int q_heads, float* states, const AttentionOptions& options) {
  TQKV_CHECK(!cache.device().is_cuda(), "attend_partial: this cache lives on ",
             to_string(cache.device()), "; GPU attention takes a GpuWorkspace and a stream");
  const std::vector<detail::SequenceRun> runs =
      detail::sequence_runs(cache, layer, seqs, q_heads, options);
  const size_t d = size_t(cache.config().head_dim);
  const size_t row = size_t(q_heads) * d;  // floats of one query token in q
  // Validate every run before writing any state.
  std::vector<Problem> problems;
  for (const detail::SequenceRun& r : runs) {
    if (!r.held) continue;
    const std::vector<size_t> ones(r.count, 1);
    problems.push_back(make_problem(cache, layer, seqs.subspan(r.first, r.count), ones, q_heads,
                                    options));
    check_problem(problems.back(), q == nullptr ? nullptr : q + r.first * row, r.count,
                  states);
  }
  if (seqs.empty()) return;
  TQKV_CHECK(q != nullptr && states != nullptr, "attend_partial: null query or states pointer");
  size_t next = 0;
  for (const detail::SequenceRun& r : runs) {
    float* st = states + r.first * size_t(q_heads) * (4 + d);
    if (!r.held) {
      std::fill_n(st, r.count * size_t(q_heads) * (4 + d), 0.0f);
      continue;
    }
    run_engine(problems[next++], CompressedSource(cache, layer, seqs.subspan(r.first, r.count)),
               q + r.first * row, nullptr, options.splits, st);
  }
}

void merge_partial_states(std::span<const float* const> states, size_t rows, int head_dim,
                          float* out) {
  TQKV_CHECK(head_dim >= 1, "merge_partial_states: head_dim must be positive, got ", head_dim);
  TQKV_CHECK(!states.empty(), "merge_partial_states: no states to merge");
  const size_t d = size_t(head_dim), stride = 4 + d;
  for (const float* s : states)
    TQKV_CHECK(s != nullptr || rows == 0, "merge_partial_states: null states pointer");
  TQKV_CHECK(out != nullptr || rows == 0, "merge_partial_states: null output pointer");
  // Each row checked before any output is written.
  for (size_t r = 0; r < rows; ++r) {
    bool any = false;
    for (const float* s : states) any |= s[r * stride + 1] > 0.0f;
    TQKV_CHECK(any, "merge_partial_states: row ", r, " has no non-empty state (no shard holds a "
               "token of its sequence)");
  }
  std::vector<float> total(2 + d), next(2 + d);
  for (size_t r = 0; r < rows; ++r) {
    const SoftmaxState into{&total[0], &total[1], &total[2], head_dim};
    into.reset();
    for (const float* s : states) {
      const float* row = s + r * stride;
      if (!(row[1] > 0.0f)) continue;  // empty
      // The states' m is in log2 units, softmax_state.hpp's merge in natural ones.
      next[0] = row[0] / kLog2e;
      next[1] = row[1];
      std::copy_n(row + 4, d, next.begin() + 2);
      merge(into, SoftmaxState{&next[0], &next[1], &next[2], head_dim});
    }
    for (size_t j = 0; j < d; ++j) out[r * d + j] = total[2 + j] / total[1];
  }
}

void attend_reference(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                      std::span<const size_t> query_tokens, const float* q, int q_heads,
                      float* out, const AttentionOptions& options) {
  const Problem p = make_problem(cache, layer, seqs, query_tokens, q_heads, options);
  check_problem(p, q, total_rows(p), out);
  const size_t d = size_t(p.dim), R = size_t(p.group);
  std::vector<float> k, v;
  std::vector<uint8_t> records;
  std::vector<double> scores;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const auto& s = p.seqs[b];
    for (int h = 0; h < p.kv_heads; ++h) {
      k.resize(s.tokens * d);
      v.resize(s.tokens * d);
      for (int side = 0; side < 2; ++side) {
        const Codec& codec = side ? cache.value_codec(layer, h) : cache.key_codec(layer, h);
        records.resize(s.tokens * codec.record_bytes());
        cache.read_records(seqs[b], layer, h, side == 1, 0, s.tokens, records.data());
        codec.decode(records.data(), s.tokens, side ? v.data() : k.data());
      }
      for (size_t i = 0; i < s.queries; ++i) {
        const size_t pos = s.tokens - s.queries + i;
        const size_t lo = p.window && pos + 1 > p.window ? pos + 1 - p.window : 0;
        for (size_t r = 0; r < R; ++r) {
          const size_t row = (s.first_query_row + i) * size_t(p.q_heads) + size_t(h) * R + r;
          const float* qr = q + row * d;
          scores.assign(pos + 1 - lo, 0.0);
          double mx = -std::numeric_limits<double>::infinity();
          for (size_t t = lo; t <= pos; ++t) {
            double sum = 0;
            for (size_t j = 0; j < d; ++j) sum += double(qr[j]) * double(k[t * d + j]);
            scores[t - lo] = sum * double(p.scale);
            mx = std::max(mx, scores[t - lo]);
          }
          double l = 0;
          std::vector<double> o(d, 0.0);
          for (size_t t = lo; t <= pos; ++t) {
            const double e = std::exp(scores[t - lo] - mx);
            l += e;
            for (size_t j = 0; j < d; ++j) o[j] += e * double(v[t * d + j]);
          }
          for (size_t j = 0; j < d; ++j) out[row * d + j] = float(o[j] / l);
        }
      }
    }
  }
}

void attend_dense(std::span<const DenseKV> seqs, int kv_heads, int head_dim, const float* q,
                  int q_heads, float* out, const AttentionOptions& options) {
  TQKV_CHECK(kv_heads >= 1, "attend_dense: kv_heads must be positive, got ", kv_heads);
  TQKV_CHECK(head_dim >= 8 && head_dim % 8 == 0, "attend_dense: head_dim must be a multiple of 8, got ", head_dim);
  Problem p;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.group = q_heads / kv_heads;
  p.dim = head_dim;
  p.scale = options.scale == 0.0f ? 1.0f / std::sqrt(float(head_dim)) : options.scale;
  p.window = options.window;
  for (size_t b = 0; b < seqs.size(); ++b) {
    TQKV_CHECK(seqs[b].tokens >= 1 && seqs[b].k && seqs[b].v, "attend_dense: sequence ", b,
               " has no keys and values");
    p.seqs.push_back({seqs[b].tokens, 1, b});
  }
  check_problem(p, q, seqs.size(), out);
  run_engine(p, DenseSource(seqs, head_dim), q, out, options.splits);
}

void attend_dequantized(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                        const float* q, int q_heads, float* out, std::vector<float>& workspace,
                        const AttentionOptions& options) {
  const auto& c = cache.config();
  const std::vector<size_t> ones(seqs.size(), 1);
  make_problem(cache, layer, seqs, ones, q_heads, options);  // validates
  const size_t d = size_t(c.head_dim), H = size_t(c.kv_heads);
  size_t total = 0;
  for (SequenceId s : seqs) total += 2 * H * cache.length(s, layer) * d;
  if (workspace.size() < total) workspace.resize(total);
  std::vector<DenseKV> dense;
  std::vector<uint8_t> records;
  float* at = workspace.data();
  for (size_t b = 0; b < seqs.size(); ++b) {
    const size_t T = cache.length(seqs[b], layer);
    float* k = at;
    float* v = at + H * T * d;
    at += 2 * H * T * d;
    for (int h = 0; h < c.kv_heads; ++h)
      for (int side = 0; side < 2; ++side) {
        const Codec& codec = side ? cache.value_codec(layer, h) : cache.key_codec(layer, h);
        records.resize(T * codec.record_bytes());
        cache.read_records(seqs[b], layer, h, side == 1, 0, T, records.data());
        codec.decode(records.data(), T, (side ? v : k) + size_t(h) * T * d);
      }
    dense.push_back({k, v, T});
  }
  attend_dense(dense, c.kv_heads, c.head_dim, q, q_heads, out, options);
}

void attend_dequantized(const KVCache& cache, int layer, std::span<const SequenceId> seqs,
                        const float* q, int q_heads, float* out,
                        const AttentionOptions& options) {
  std::vector<float> workspace;
  attend_dequantized(cache, layer, seqs, q, q_heads, out, workspace, options);
}

}  // namespace tqkv
