// torch.ops.ltdist.calibrated_sample: CPU (OpenMP) implementation, Meta implementation for tracing,
// and the CUDA binding when built with LTDIST_WITH_CUDA. Layout and maths: calibrated_sampler.h.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "calibrated_sampler.h"
#include "sampler_rng.h"

#ifdef LTDIST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ltdist {
namespace {

void check_inputs(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                  const at::Tensor& source, const at::Tensor& source_class, const at::Tensor& neighbours,
                  const at::Tensor& weights, int64_t samples_per_source) {
  TORCH_CHECK(bank.dim() == 2, "calibrated_sample: bank must be [rows, d], got ", bank.sizes());
  const int64_t d = bank.size(1);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2, "calibrated_sample: offsets must be [C+1], got ",
              offsets.sizes());
  const int64_t C = offsets.size(0) - 1;
  TORCH_CHECK(centres.dim() == 2 && centres.size(0) == C && centres.size(1) == d,
              "calibrated_sample: centres must be [", C, ", ", d, "], got ", centres.sizes());
  TORCH_CHECK(source.dim() == 2 && source.size(1) == d, "calibrated_sample: source must be [S, ", d,
              "], got ", source.sizes());
  const int64_t S = source.size(0);
  TORCH_CHECK(source_class.dim() == 1 && source_class.size(0) == S,
              "calibrated_sample: source_class must be [", S, "], got ", source_class.sizes());
  TORCH_CHECK(neighbours.dim() == 2 && neighbours.size(0) == S,
              "calibrated_sample: neighbours must be [", S, ", M], got ", neighbours.sizes());
  TORCH_CHECK(weights.sizes() == neighbours.sizes(), "calibrated_sample: weights must have the shape of "
              "neighbours ", neighbours.sizes(), ", got ", weights.sizes());
  TORCH_CHECK(samples_per_source >= 1, "calibrated_sample: samples_per_source must be >= 1, got ",
              samples_per_source);
  struct Arg {
    const char* name;
    const at::Tensor& tensor;
    at::ScalarType dtype;
  };
  const Arg args[] = {{"bank", bank, at::kFloat},         {"offsets", offsets, at::kLong},
                      {"centres", centres, at::kFloat},   {"source", source, at::kFloat},
                      {"source_class", source_class, at::kLong}, {"neighbours", neighbours, at::kLong},
                      {"weights", weights, at::kFloat}};
  for (const Arg& a : args) {
    TORCH_CHECK(a.tensor.scalar_type() == a.dtype, "calibrated_sample: ", a.name, " must be ", a.dtype, ", got ",
                a.tensor.scalar_type());
    TORCH_CHECK(a.tensor.device() == bank.device(), "calibrated_sample: ", a.name, " is on ", a.tensor.device(),
                " but bank is on ", bank.device(), "; all tensors must be on one device");
  }
}

// Adds coef · (Z_cᵀ E_r − ĉ_c Σ_i E_r[i]) to out_r for every draw r of one source, as one GEMM
// out[R,d] += E[R,n] · Z_c[n,d] (single-threaded BLAS inside the parallel loop over sources).
// E_r[i] = normal(key_r, base + i).
void add_class_term(const SamplerArgs& a, const at::Tensor& bank, int64_t cls, float coef, uint64_t base,
                    const uint64_t* keys, at::Tensor& out, std::vector<float>& eps, std::vector<float>& sums) {
  const int64_t lo = a.offsets[cls], n = a.offsets[cls + 1] - lo, R = a.samples_per_source, d = a.d;
  if (n <= 1) return;  // one feature: no spread around the centre, no covariance
  const float c = coef / std::sqrt(static_cast<float>(n - 1));
  eps.resize(static_cast<size_t>(n * R));
  for (int64_t r = 0; r < R; ++r) sums[r] = fill_normals(keys[r], base, n, c, eps.data() + r * n);
  const at::Tensor e = at::from_blob(eps.data(), {R, n}, bank.options());
  out.addmm_(e, bank.narrow(0, lo, n));
  const float* centre = a.centres + cls * d;
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float s = sums[r];
#pragma omp simd
    for (int64_t f = 0; f < d; ++f) o[r * d + f] -= s * centre[f];
  }
}

void sample_source(const SamplerArgs& a, const at::Tensor& bank, const at::Tensor& out_all, int64_t s,
                   std::vector<float>& eps, std::vector<float>& sums, std::vector<uint64_t>& keys) {
  const int64_t d = a.d, M = a.num_neighbours, R = a.samples_per_source;
  at::Tensor out_s = out_all.select(0, s);  // [R, d] view
  float* out = out_s.data_ptr<float>();
  const float* z = a.source + s * d;
  const int64_t* nb = a.neighbours + s * M;
  const float* w = a.weights + s * M;
  for (int64_t r = 0; r < R; ++r) keys[r] = draw_key(a.seed, s, r);
  // μ = (1−α) z̃ + α Σ w_m ĉ_m, written into every draw
  for (int64_t f = 0; f < d; ++f) out[f] = (1.0f - a.alpha) * z[f];
  for (int64_t m = 0; m < M; ++m) {
    const float* centre = a.centres + nb[m] * d;
    const float c = a.alpha * w[m];
    for (int64_t f = 0; f < d; ++f) out[f] += c * centre[f];
  }
  for (int64_t r = 1; r < R; ++r) std::copy(out, out + d, out + r * d);

  const int64_t own = a.source_class[s];
  uint64_t base = 0;
  add_class_term(a, bank, own, 1.0f - a.alpha, base, keys.data(), out_s, eps, sums);
  base += a.offsets[own + 1] - a.offsets[own];
  for (int64_t m = 0; m < M; ++m) {
    add_class_term(a, bank, nb[m], a.alpha * std::sqrt(w[m]), base, keys.data(), out_s, eps, sums);
    base += a.offsets[nb[m] + 1] - a.offsets[nb[m]];
  }
  const float sb = std::sqrt(a.beta);
  eps.resize(static_cast<size_t>(d));
  for (int64_t r = 0; r < R; ++r) {
    fill_normals(keys[r], base, d, sb, eps.data());
    for (int64_t f = 0; f < d; ++f) out[r * d + f] += eps[f];
  }
}

SamplerArgs make_args(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                      const at::Tensor& source, const at::Tensor& source_class, const at::Tensor& neighbours,
                      const at::Tensor& weights, double alpha, double beta, int64_t samples_per_source,
                      int64_t seed, at::Tensor& out) {
  SamplerArgs a;
  a.bank = bank.data_ptr<float>();
  a.offsets = offsets.data_ptr<int64_t>();
  a.centres = centres.data_ptr<float>();
  a.source = source.data_ptr<float>();
  a.source_class = source_class.data_ptr<int64_t>();
  a.neighbours = neighbours.data_ptr<int64_t>();
  a.weights = weights.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.d = bank.size(1);
  a.num_sources = source.size(0);
  a.num_neighbours = neighbours.size(1);
  a.samples_per_source = samples_per_source;
  a.alpha = static_cast<float>(alpha);
  a.beta = static_cast<float>(beta);
  a.seed = static_cast<uint64_t>(seed);
  return a;
}

}  // namespace

at::Tensor calibrated_sample_cpu(const at::Tensor& bank_, const at::Tensor& offsets_, const at::Tensor& centres_,
                                 const at::Tensor& source_, const at::Tensor& source_class_,
                                 const at::Tensor& neighbours_, const at::Tensor& weights_, double alpha,
                                 double beta, int64_t samples_per_source, int64_t seed) {
  check_inputs(bank_, offsets_, centres_, source_, source_class_, neighbours_, weights_, samples_per_source);
  const at::Tensor bank = bank_.contiguous(), offsets = offsets_.contiguous(), centres = centres_.contiguous(),
                   source = source_.contiguous(), source_class = source_class_.contiguous(),
                   neighbours = neighbours_.contiguous(), weights = weights_.contiguous();
  at::Tensor out = at::empty({source.size(0), samples_per_source, bank.size(1)}, bank.options());
  const SamplerArgs a = make_args(bank, offsets, centres, source, source_class, neighbours, weights, alpha, beta,
                                  samples_per_source, seed, out);
  // at::parallel_for (OpenMP in torch's CPU build) marks the region as parallel, so the GEMMs inside
  // run single-threaded; the thread count follows torch.set_num_threads.
  at::parallel_for(0, a.num_sources, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> eps, sums(static_cast<size_t>(samples_per_source));
    std::vector<uint64_t> keys(static_cast<size_t>(samples_per_source));
    for (int64_t s = begin; s < end; ++s) sample_source(a, bank, out, s, eps, sums, keys);
  });
  return out;
}

at::Tensor calibrated_sample_meta(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                                  const at::Tensor& source, const at::Tensor& source_class,
                                  const at::Tensor& neighbours, const at::Tensor& weights, double alpha,
                                  double beta, int64_t samples_per_source, int64_t seed) {
  return at::empty({source.size(0), samples_per_source, bank.size(1)}, bank.options());
}

#ifdef LTDIST_WITH_CUDA
at::Tensor calibrated_sample_cuda(const at::Tensor& bank_, const at::Tensor& offsets_, const at::Tensor& centres_,
                                  const at::Tensor& source_, const at::Tensor& source_class_,
                                  const at::Tensor& neighbours_, const at::Tensor& weights_, double alpha,
                                  double beta, int64_t samples_per_source, int64_t seed) {
  check_inputs(bank_, offsets_, centres_, source_, source_class_, neighbours_, weights_, samples_per_source);
  const c10::cuda::CUDAGuard guard(bank_.device());
  const at::Tensor bank = bank_.contiguous(), offsets = offsets_.contiguous(), centres = centres_.contiguous(),
                   source = source_.contiguous(), source_class = source_class_.contiguous(),
                   neighbours = neighbours_.contiguous(), weights = weights_.contiguous();
  at::Tensor out = at::empty({source.size(0), samples_per_source, bank.size(1)}, bank.options());
  const SamplerArgs a = make_args(bank, offsets, centres, source, source_class, neighbours, weights, alpha, beta,
                                  samples_per_source, seed, out);
  calibrated_sample_cuda_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  return out;
}
#endif

}  // namespace ltdist

TORCH_LIBRARY_FRAGMENT(ltdist, m) {
  m.def("calibrated_sample(Tensor bank, Tensor offsets, Tensor centres, Tensor source, Tensor source_class, "
        "Tensor neighbours, Tensor weights, float alpha, float beta, int samples_per_source, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(ltdist, CPU, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_cpu); }

TORCH_LIBRARY_IMPL(ltdist, Meta, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_meta); }

#ifdef LTDIST_WITH_CUDA
TORCH_LIBRARY_IMPL(ltdist, CUDA, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_cuda); }
#endif
