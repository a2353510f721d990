// Calibrated Gaussian sampling (paper 2, §3.3; README.md "How it works: MPDT"), shared layout.
//
// For a source feature z̃ of class o with neighbour classes k_1..k_M and weights w_m, draw
//   x = μ + (1−α) A_o ε₀ + α Σ_m √w_m A_{k_m} ε_m + √β ε + √β_s η·1,   μ = (1−α) z̃ + α Σ_m w_m ĉ_{k_m},
// with A_k = (Z_k − ĉ_k)ᵀ / √(N_k − 1) (the centred bank rows of class k), which is exactly
// N(μ, (1−α)² Σ_o + α² Σ_m w_m Σ_{k_m} + β I + β_s 11ᵀ). A class with N_k = 1 adds no covariance.
// A_k ε = (Z_kᵀ ε − ĉ_k Σ_i ε_i)/√(N_k − 1), so the centred rows are never formed.
//
// Normal stream of draw (s, r): key = draw_key(seed, stream[s], r); index layout
//   [rows of class o][rows of k_1] … [rows of k_M][d isotropic][1 shared]
#pragma once

#include <cstdint>

namespace ltdist {

#ifdef LTDIST_WITH_CUDA
// CUDA launcher (csrc/cuda/calibrated_sampler.cu); all pointers are device pointers:
//   out[j, i] = scales[j] · normal(keys[j], bases[j] + i)  for j < rows, i < count (row-major [rows, count]).
void fill_normals_cuda_launch(const uint64_t* keys, const uint64_t* bases, const float* scales, int64_t rows,
                              int64_t count, float* out, void* cuda_stream);
#endif

}  // namespace ltdist
