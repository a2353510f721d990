// CUDA launcher of the calibrated Gaussian sampler (maths and layout: ../calibrated_sampler.h).
// Plain CUDA, no torch headers: the C++ binding (../calibrated_sampler.cpp) passes raw pointers.
//
// One block computes kDraws draws of one source over one tile of up to kCols · kMaxThreads columns
// (grid z: column tiles, so any d works). Each thread owns up to kCols columns
// f = tile start + tid + j·blockDim and keeps kDraws × kCols accumulators in registers; the normals of
// a chunk of bank rows are generated once per block into shared memory (same counter-based stream as
// the CPU path, so every column tile draws the same normals), then every thread streams those rows
// (coalesced) into its accumulators.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "../calibrated_sampler.h"
#include "../sampler_rng.h"

namespace ltdist {
namespace {

constexpr int kDraws = 8;    // draws per block
constexpr int kCols = 8;     // columns per thread
constexpr int kChunk = 32;   // bank rows per shared-memory chunk
// Threads per block at most. The 64 accumulators need ~116 registers; __launch_bounds__ caps them at
// 65536 / 512 = 128, so a block of kMaxThreads always launches (1024 threads would force 64 and spill).
constexpr int kMaxThreads = 512;
constexpr int64_t kTileCols = static_cast<int64_t>(kCols) * kMaxThreads;  // columns per block at most
constexpr int64_t kMaxGrid = 65535;                                      // blocks on grid y and z

__device__ void add_class_term(const SamplerArgs& a, int64_t cls, float coef, uint64_t base,
                               const uint64_t* keys, int draws, int64_t col0, float (&acc)[kDraws][kCols],
                               float (*eps)[kDraws], float* sums) {
  const int64_t lo = a.offsets[cls], n = a.offsets[cls + 1] - lo, d = a.d;
  if (n <= 1) return;  // one feature: no covariance
  const float c = coef * rsqrtf(static_cast<float>(n - 1));
  __syncthreads();  // the previous term may still be reading sums
  if (threadIdx.x < kDraws) sums[threadIdx.x] = 0.0f;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int rows = n - i0 < kChunk ? static_cast<int>(n - i0) : kChunk;
    __syncthreads();
    for (int t = threadIdx.x; t < kChunk * kDraws; t += blockDim.x) {
      const int i = t / kDraws, r = t % kDraws;
      eps[i][r] = (i < rows && r < draws) ? c * normal(keys[r], base + i0 + i) : 0.0f;
    }
    __syncthreads();
    if (threadIdx.x < kDraws)
      for (int i = 0; i < rows; ++i) sums[threadIdx.x] += eps[i][threadIdx.x];
    for (int i = 0; i < rows; ++i) {
      const float* z = a.bank + (lo + i0 + i) * d;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int64_t f = col0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
        if (f >= d) break;
        const float zf = z[f];
#pragma unroll
        for (int r = 0; r < kDraws; ++r) acc[r][j] += eps[i][r] * zf;
      }
    }
  }
  __syncthreads();
  const float* centre = a.centres + cls * d;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t f = col0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (f >= d) break;
#pragma unroll
    for (int r = 0; r < kDraws; ++r) acc[r][j] -= sums[r] * centre[f];
  }
}

__global__ void __launch_bounds__(kMaxThreads) calibrated_sample_kernel(const SamplerArgs a) {
  __shared__ float eps[kChunk][kDraws];
  __shared__ float sums[kDraws];
  __shared__ uint64_t keys[kDraws];
  const int64_t s = blockIdx.x;  // sources on x (up to 2^31 − 1 blocks), draw tiles on y, column tiles on z
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kDraws;
  const int64_t left = a.samples_per_source - r0;
  const int draws = left < kDraws ? static_cast<int>(left) : kDraws;
  const int64_t d = a.d, M = a.num_neighbours;
  const int64_t col0 = static_cast<int64_t>(blockIdx.z) * kCols * blockDim.x;
  if (threadIdx.x < kDraws) keys[threadIdx.x] = draw_key(a.seed, s, r0 + threadIdx.x);

  float acc[kDraws][kCols];
  const int64_t* nb = a.neighbours + s * M;
  const float* w = a.weights + s * M;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t f = col0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    float mu = 0.0f;
    if (f < d) {
      mu = (1.0f - a.alpha) * a.source[s * d + f];
      for (int64_t m = 0; m < M; ++m) mu += a.alpha * w[m] * a.centres[nb[m] * d + f];
    }
#pragma unroll
    for (int r = 0; r < kDraws; ++r) acc[r][j] = mu;
  }
  __syncthreads();

  const int64_t own = a.source_class[s];
  uint64_t base = 0;
  add_class_term(a, own, 1.0f - a.alpha, base, keys, draws, col0, acc, eps, sums);
  base += a.offsets[own + 1] - a.offsets[own];
  for (int64_t m = 0; m < M; ++m) {
    add_class_term(a, nb[m], a.alpha * sqrtf(w[m]), base, keys, draws, col0, acc, eps, sums);
    base += a.offsets[nb[m] + 1] - a.offsets[nb[m]];
  }
  const float sb = sqrtf(a.beta);
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int64_t f = col0 + threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (f >= d) break;
#pragma unroll
    for (int r = 0; r < kDraws; ++r)
      if (r < draws) a.out[(s * a.samples_per_source + r0 + r) * d + f] = acc[r][j] + sb * normal(keys[r], base + f);
  }
}

}  // namespace

void calibrated_sample_cuda_launch(const SamplerArgs& args, void* cuda_stream) {
  if (args.num_sources == 0 || args.d == 0) return;
  if ((args.samples_per_source + kDraws - 1) / kDraws > kMaxGrid)
    throw std::invalid_argument("calibrated_sample (CUDA): samples_per_source must be <= " +
                                std::to_string(kMaxGrid * kDraws) + ", got " + std::to_string(args.samples_per_source));
  if (args.d > kMaxGrid * kTileCols)
    throw std::invalid_argument("calibrated_sample (CUDA): feature dimension d = " + std::to_string(args.d) +
                                " exceeds " + std::to_string(kMaxGrid * kTileCols));
  const int64_t tiles = (args.d + kTileCols - 1) / kTileCols;
  // one tile: just enough warps for d; several: full blocks
  const int64_t cols = tiles == 1 ? args.d : kTileCols;
  const int threads = static_cast<int>(((cols + kCols - 1) / kCols + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(args.num_sources),
                  static_cast<unsigned>((args.samples_per_source + kDraws - 1) / kDraws), static_cast<unsigned>(tiles));
  calibrated_sample_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("calibrated_sample (CUDA): launch failed: ") + cudaGetErrorString(err));
}

}  // namespace ltdist
