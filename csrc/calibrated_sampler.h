// Calibrated Gaussian sampling (paper 2, §3.3; README.md "How it works: MPDT"), shared layout.
//
// For a source feature z̃ of class o with neighbour classes k_1..k_M and weights w_m, draw
//   x = μ + (1−α) A_o ε₀ + α Σ_m √w_m A_{k_m} ε_m + √β ε,   μ = (1−α) z̃ + α Σ_m w_m ĉ_{k_m},
// with A_k = (Z_k − ĉ_k)ᵀ / √(N_k − 1) (the centred bank rows of class k), which is exactly
// N(μ, (1−α)² Σ_o + α² Σ_m w_m Σ_{k_m} + β I). A class with N_k = 1 adds no covariance.
// A_k ε = (Z_kᵀ ε − ĉ_k Σ_i ε_i)/√(N_k − 1), so the centred rows are never formed.
//
// Normal stream of draw (s, r): key = draw_key(seed, s, r); index layout
//   [rows of class o][rows of k_1] … [rows of k_M][d isotropic]  (see stream_base below).
#pragma once

#include <cstdint>

namespace ltdist {

struct SamplerArgs {
  const float* bank;        // [num_rows, d], rows grouped by class
  const int64_t* offsets;   // [C + 1], class c owns bank rows offsets[c] .. offsets[c+1]-1
  const float* centres;     // [C, d] ĉ_c
  const float* source;      // [S, d] z̃
  const int64_t* source_class;  // [S]
  const int64_t* neighbours;    // [S, M]
  const float* weights;         // [S, M]
  float* out;                   // [S, R, d]
  int64_t d, num_sources, num_neighbours, samples_per_source;
  float alpha, beta;
  uint64_t seed;
};

#ifdef LTDIST_WITH_CUDA
// CUDA launcher (csrc/cuda/calibrated_sampler.cu); all pointers are device pointers.
void calibrated_sample_cuda_launch(const SamplerArgs& args, void* cuda_stream);
#endif

}  // namespace ltdist
