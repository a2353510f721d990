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

// Standard normal numbers 2p and 2p+1 of the stream `key` (Box–Muller on one 64-bit hash).
LTDIST_HD void normal_pair(uint64_t key, uint64_t p, float& even, float& odd) {
  const uint64_t h = mix64(key ^ mix64(p));
  // two uniforms: u1 in (0, 1] (never 0, so log() is finite), u2 in [0, 1)
  const float u1 = (static_cast<float>(static_cast<uint32_t>(h)) + 1.0f) * 2.3283064365386963e-10f;
  const float u2 = static_cast<float>(static_cast<uint32_t>(h >> 32)) * 2.3283064365386963e-10f;
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.283185307179586f * u2;
  even = radius * cosf(angle);
  odd = radius * sinf(angle);
}

// Standard normal number j of the stream `key`.
LTDIST_HD float normal(uint64_t key, uint64_t j) {
  float even, odd;
  normal_pair(key, j >> 1, even, odd);
  return (j & 1) ? odd : even;
}

// dst[i] = scale · normal(key, base + i) for i < count, one hash per pair; returns Σ dst[i].
inline float fill_normals(uint64_t key, uint64_t base, int64_t count, float scale, float* dst) {
  float sum = 0.0f;
  int64_t i = 0;
  if (count > 0 && (base & 1)) {  // odd start: the second half of a pair
    dst[i] = scale * normal(key, base);
    sum += dst[i++];
  }
  for (; i + 1 < count; i += 2) {
    float even, odd;
    normal_pair(key, (base + i) >> 1, even, odd);
    dst[i] = scale * even;
    dst[i + 1] = scale * odd;
    sum += dst[i] + dst[i + 1];
  }
  if (i < count) {
    dst[i] = scale * normal(key, base + i);
    sum += dst[i];
  }
  return sum;
}

}  // namespace ltdist
