// Deterministic randomness for rotations and QJL projections.
//
// Every random quantity in tqkv (Hadamard signs, dense rotation matrices, QJL matrices) is a pure
// function of (seed, stream, substream, index), computed with the counter-based generator
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the same
// algorithm as Random123 and cuRAND's Philox). Counter-based means any element can be regenerated
// on its own, in any order, on the CPU or the GPU.
//
// Normals are made by Box–Muller with a log and a sine/cosine written here from +, *, / and fma
// only (see random.cpp), never with the C library's transcendentals or std::normal_distribution,
// whose results differ between standard libraries. With IEEE arithmetic and no floating-point
// contraction (tqkv builds with -ffp-contract=off) every platform produces the same bits.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace tqkv::random {

/// One Philox4x32-10 block: 4 counter words and 2 key words in, 4 random words out.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                      std::array<uint32_t, 2> key);

/// What a stream of random numbers is used for; part of the counter, so streams never overlap.
enum class Stream : uint32_t {
  hadamard_signs = 1,  ///< the random signs s of the randomized Hadamard transform
  dense_rotation = 2,  ///< the Gaussian matrix whose QR factor is the dense rotation
  qjl_projection = 3,  ///< the Gaussian QJL matrix S
  synthetic_data = 4,  ///< built-in test and demo data (tqkv demo, tqkv eval)
};

/// Where a block comes from. Counter = (block index low, block index high, substream, stream);
/// key = (seed low, seed high). `substream` tells apart independent quantizers that share a seed
/// (the channel groups of a fractional-bit codec).
struct StreamId {
  uint64_t seed = 0;
  Stream stream = Stream::hadamard_signs;
  uint32_t substream = 0;
};

/// Random word `i` of a stream: word i % 4 of block i / 4.
uint32_t word(const StreamId& id, uint64_t i);

/// out[j] = +1 or -1: bit (j % 32) of word (j / 32), set means -1.
void fill_signs(const StreamId& id, size_t n, float* out);

/// out[j] = standard normal number j of the stream. Normals 2k and 2k+1 are the Box–Muller pair of
/// block k: u1 from words 0 and 1, u2 from words 2 and 3, each a 53-bit uniform in (0, 1);
/// (r cos 2πu2, r sin 2πu2) with r = sqrt(-2 ln u1).
void fill_normals(const StreamId& id, size_t n, double* out);

/// Natural log of a positive finite double, deterministic (fma-only series), |error| < 4 ulp.
/// Accuracy only needs to be good; what matters is that every platform gives the same bits.
double det_log(double x);

/// sin(2πu) and cos(2πu) for u in [0, 1), deterministic (fma-only series), |error| < 2e-16.
void det_sincos_2pi(double u, double* sin_out, double* cos_out);

}  // namespace tqkv::random
