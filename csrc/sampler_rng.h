// Counter-based normal random numbers shared by the CPU and CUDA calibrated samplers.
//
// normal(key, j) is a pure function of (key, j), so a draw does not depend on the thread count,
// on the order of the work, or on the device: the C++ and CUDA paths give the same samples
// (up to the rounding of log/cos). key = draw_key(seed, source, draw).
#pragma once

#include <cstdint>
#include <cmath>

#ifdef __CUDACC__
#define LTDIST_HD __host__ __device__ __forceinline__
#else
#define LTDIST_HD inline
#endif

namespace ltdist {

// splitmix64 finaliser: a bijective 64-bit mixer with good avalanche.
LTDIST_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

LTDIST_HD uint64_t draw_key(uint64_t seed, uint64_t source, uint64_t draw) {
  return mix64(mix64(seed) ^ mix64((source << 24) ^ draw ^ 0xA5A5A5A5ULL));
}

// Standard normal number j of the stream `key` (Box–Muller on one 64-bit hash per pair).
LTDIST_HD float normal(uint64_t key, uint64_t j) {
  const uint64_t h = mix64(key ^ mix64(j >> 1));
  // two uniforms in (0, 1]: 32 bits each, never 0 so log() is finite
  const float u1 = (static_cast<float>(static_cast<uint32_t>(h)) + 1.0f) * 2.3283064365386963e-10f;
  const float u2 = static_cast<float>(static_cast<uint32_t>(h >> 32)) * 2.3283064365386963e-10f;
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.283185307179586f * u2;
  return (j & 1) ? radius * sinf(angle) : radius * cosf(angle);
}

}  // namespace ltdist
