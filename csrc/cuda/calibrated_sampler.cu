// CUDA part of the calibrated Gaussian sampler (maths and layout: ../calibrated_sampler.h): the normals.
// Plain CUDA, no torch headers: the C++ binding (../calibrated_sampler.cpp) passes raw pointers and runs
// the class-term GEMMs itself through ATen (cuBLAS), so only the counter-based stream lives here; it is the
// one the CPU path uses (../sampler_rng.h), so both devices draw the same normals.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../calibrated_sampler.h"
#include "../sampler_rng.h"

namespace ltdist {
namespace {

constexpr int kThreads = 256;

// grid x: column tiles of kThreads normals, grid y: rows (chunked by the launcher below 65535)
__global__ void __launch_bounds__(kThreads) fill_normals_kernel(const uint64_t* keys, const uint64_t* bases,
                                                                 const float* scales, int64_t row0, int64_t count,
                                                                 float* out) {
  const int64_t j = row0 + blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < count) out[j * count + i] = scales[j] * normal(keys[j], bases[j] + i);
}

}  // namespace

void fill_normals_cuda_launch(const uint64_t* keys, const uint64_t* bases, const float* scales, int64_t rows,
                              int64_t count, float* out, void* cuda_stream) {
  if (rows == 0 || count == 0) return;
  constexpr int64_t kMaxGridY = 65535;
  const unsigned tiles = static_cast<unsigned>((count + kThreads - 1) / kThreads);
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridY) {
    const int64_t chunk = rows - row0 < kMaxGridY ? rows - row0 : kMaxGridY;
    const dim3 grid(tiles, static_cast<unsigned>(chunk));
    fill_normals_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(keys, bases, scales, row0,
                                                                                       count, out);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("calibrated_sample (CUDA): normal generation failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace ltdist
