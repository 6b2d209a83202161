// CPU kernels of attention: the inner loops over a run of tokens, for packed codes (compressed
// cache) and for float32 rows (the uncompressed baseline and dequantized tiles); and the product
// of float32 rows with an int8 matrix, the projections of the model harness (llama.hpp).
//
// One interface, several instruction sets: kernels_scalar.cpp is the reference and runs
// everywhere; kernels_avx2.cpp (AVX2 + FMA) and kernels_avx512.cpp (AVX-512F), both written once
// in simd_kernels.hpp and compiled with their own flags, are chosen at run time by what the CPU
// has. TQKV_SIMD=scalar|avx2|avx512 in the environment overrides the choice. Every faster path
// is tested against the scalar one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tqkv::cpu {

/// `tokens` packed code vectors of `dim` b-bit codes each (bitpack.hpp layout), `stride` bytes
/// apart. dim is a multiple of 8.
struct CodeRun {
  const uint8_t* codes = nullptr;
  size_t stride = 0;
  int tokens = 0;
  int dim = 0;
};

/// Float32 rows: `tokens` rows of `dim` floats, `stride` floats apart.
struct FloatRun {
  const float* rows = nullptr;
  size_t stride = 0;
  int tokens = 0;
  int dim = 0;
};

/// Kernels for one code width. `table` has 2^bits entries (the value each code stands for).
struct CodeKernels {
  /// out[r * out_stride + t] = Σ_j q[r * run.dim + j] · table[code(t, j)],  r < rows, t < tokens.
  void (*scores)(const CodeRun& run, const float* table, const float* q, int rows, float* out,
                 size_t out_stride);
  /// acc[r * acc_stride + j] += Σ_t w[r * w_stride + t] · table[code(t, j)].
  void (*accumulate)(const CodeRun& run, const float* table, const float* w, size_t w_stride,
                     int rows, float* acc, size_t acc_stride);
  /// out[t * run.dim + j] = table[code(t, j)] (a tile, for many-row prefill).
  void (*expand)(const CodeRun& run, const float* table, float* out);
};

/// The same two operations on float32 rows.
struct FloatKernels {
  void (*scores)(const FloatRun& run, const float* q, int rows, float* out, size_t out_stride);
  void (*accumulate)(const FloatRun& run, const float* w, size_t w_stride, int rows,
                     float* acc, size_t acc_stride);
  /// x[i] = exp(x[i]) for i < n (x <= 0 or −inf; −inf gives exactly 0).
  void (*exp)(float* x, int n);
  /// y[r * y_stride + j] = Σ_i x[r * in + i] · w[i * w_stride + j] for r < rows, j < cols. Each
  /// product is rounded to float32 and added in order of i (no fused multiply-add), so every
  /// instruction set gives the scalar loop's bits.
  void (*int8_matmul)(const float* x, int rows, int in, const int8_t* w, size_t w_stride,
                      int cols, float* y, size_t y_stride);
};

enum class Isa { scalar, avx2, avx512 };

/// The instruction set used: the best the CPU supports unless TQKV_SIMD says otherwise.
Isa active_isa();
/// Whether `isa` can run on this CPU.
bool isa_available(Isa isa);
const char* to_string(Isa isa);

/// Kernels for bits 1..8 on `isa` (which must be available).
const CodeKernels& code_kernels(int bits, Isa isa = active_isa());
const FloatKernels& float_kernels(Isa isa = active_isa());

// Per-ISA tables, defined in kernels_<isa>.cpp.
const CodeKernels& code_kernels_scalar(int bits);
const FloatKernels& float_kernels_scalar();
const CodeKernels& code_kernels_avx2(int bits);
const FloatKernels& float_kernels_avx2();
const CodeKernels& code_kernels_avx512(int bits);
const FloatKernels& float_kernels_avx512();

}  // namespace tqkv::cpu
