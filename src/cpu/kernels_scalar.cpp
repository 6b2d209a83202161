// The reference kernels: plain loops, one code at a time.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/kernels.hpp"
#include "tqkv/bitpack.hpp"
#include "tqkv/error.hpp"

namespace tqkv::cpu {

namespace {

template <int Bits>
void unpack_token(const CodeRun& run, int t, uint8_t* idx) {
  unpack_codes<Bits>(run.codes + size_t(t) * run.stride, size_t(run.dim), idx);
}

template <int Bits>
void code_scores(const CodeRun& run, const float* table, const float* q, int rows, float* out,
                 size_t out_stride) {
  uint8_t idx[4096];
  for (int t = 0; t < run.tokens; ++t) {
    unpack_token<Bits>(run, t, idx);
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + size_t(r) * size_t(run.dim);
      float s = 0;
      for (int j = 0; j < run.dim; ++j) s += qr[j] * table[idx[j]];
      out[size_t(r) * out_stride + size_t(t)] = s;
    }
  }
}

template <int Bits>
void code_accumulate(const CodeRun& run, const float* table, const float* w, size_t w_stride,
                     int rows, float* acc, size_t acc_stride) {
  uint8_t idx[4096];
  for (int t = 0; t < run.tokens; ++t) {
    unpack_token<Bits>(run, t, idx);
    for (int r = 0; r < rows; ++r) {
      const float wt = w[size_t(r) * w_stride + size_t(t)];
      float* a = acc + size_t(r) * acc_stride;
      for (int j = 0; j < run.dim; ++j) a[j] += wt * table[idx[j]];
    }
  }
}

template <int Bits>
void code_expand(const CodeRun& run, const float* table, float* out) {
  uint8_t idx[4096];
  for (int t = 0; t < run.tokens; ++t) {
    unpack_token<Bits>(run, t, idx);
    for (int j = 0; j < run.dim; ++j) out[size_t(t) * size_t(run.dim) + size_t(j)] = table[idx[j]];
  }
}

void float_scores(const FloatRun& run, const float* q, int rows, float* out, size_t out_stride) {
  for (int t = 0; t < run.tokens; ++t) {
    const float* k = run.rows + size_t(t) * run.stride;
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + size_t(r) * size_t(run.dim);
      float s = 0;
      for (int j = 0; j < run.dim; ++j) s += qr[j] * k[j];
      out[size_t(r) * out_stride + size_t(t)] = s;
    }
  }
}

void float_accumulate(const FloatRun& run, const float* w, size_t w_stride, int rows,
                      float* acc, size_t acc_stride) {
  for (int t = 0; t < run.tokens; ++t) {
    const float* v = run.rows + size_t(t) * run.stride;
    for (int r = 0; r < rows; ++r) {
      const float wt = w[size_t(r) * w_stride + size_t(t)];
      float* a = acc + size_t(r) * acc_stride;
      for (int j = 0; j < run.dim; ++j) a[j] += wt * v[j];
    }
  }
}

void int8_matmul(const float* x, int rows, int in, const int8_t* w, size_t w_stride, int cols,
                 float* y, size_t y_stride) {
  for (int r = 0; r < rows; ++r) {
    float* yr = y + size_t(r) * y_stride;
    std::fill(yr, yr + cols, 0.0f);
    for (int i = 0; i < in; ++i) {
      const float xi = x[size_t(r) * size_t(in) + size_t(i)];
      const int8_t* wi = w + size_t(i) * w_stride;
      for (int j = 0; j < cols; ++j) yr[j] += xi * float(wi[j]);
    }
  }
}

void exp_inplace(float* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <int Bits>
constexpr CodeKernels make() {
  return {code_scores<Bits>, code_accumulate<Bits>, code_expand<Bits>};
}
constexpr CodeKernels kCode[8] = {make<1>(), make<2>(), make<3>(), make<4>(),
                                  make<5>(), make<6>(), make<7>(), make<8>()};
constexpr FloatKernels kFloat = {float_scores, float_accumulate, exp_inplace, int8_matmul};

}  // namespace

const CodeKernels& code_kernels_scalar(int bits) {
  TQKV_CHECK(bits >= 1 && bits <= 8, "code kernels: bit width must be in 1..8, got ", bits);
  return kCode[bits - 1];
}
const FloatKernels& float_kernels_scalar() { return kFloat; }

}  // namespace tqkv::cpu
