// torch.ops.ltdist.calibrated_sample: one implementation for CPU and CUDA built from ATen ops, and a Meta
// implementation for tracing. Layout and maths: calibrated_sampler.h.
//
// Every class term of a call is one GEMM: the draws of all (source, slot) pairs that use class k are the
// rows of E_k [rows, N_k] (one fill from the counter-based stream, sampler_rng.h), and
// E_k · Z_k − (Σ_i E_k[·, i]) ĉ_kᵀ goes through the BLAS (at::mm: MKL/OpenBLAS on CPU, cuBLAS on CUDA)
// and is added to the draws' rows. μ and the βI / β_s·11ᵀ noise are written first, then the class terms
// are added in class order, so the sum of each draw has a fixed order. On CPU a GEMM is split into column
// blocks of fixed width (single-threaded BLAS per block, blocks in parallel), so the result does not
// depend on the thread count.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "calibrated_sampler.h"
#include "sampler_rng.h"

#ifdef LTDIST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ltdist {
namespace {

constexpr int64_t kColumnBlock = 256;  // CPU GEMM column block (fixed: thread-count independent results)

enum class Precision { kFp32, kTf32, kBf16 };

Precision parse_precision(const std::string& p, bool cuda) {
  if (p == "fp32") return Precision::kFp32;
  if (p == "bf16") return Precision::kBf16;
  TORCH_CHECK(p == "tf32", "calibrated_sample: precision must be fp32, tf32 or bf16, got ", p);
  TORCH_CHECK(cuda, "calibrated_sample: precision tf32 needs CUDA tensors (on CPU: fp32 or bf16)");
  return Precision::kTf32;  // the GEMM is an fp32 one; the caller enables TF32 for cuBLAS
}

void check_inputs(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                  const at::Tensor& source, const at::Tensor& source_class, const at::Tensor& neighbours,
                  const at::Tensor& weights, const at::Tensor& streams, int64_t samples_per_source) {
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
  TORCH_CHECK(streams.dim() == 1 && streams.size(0) == S, "calibrated_sample: streams must be [", S, "], got ",
              streams.sizes());
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
                      {"weights", weights, at::kFloat},   {"streams", streams, at::kLong}};
  for (const Arg& a : args) {
    TORCH_CHECK(a.tensor.scalar_type() == a.dtype, "calibrated_sample: ", a.name, " must be ", a.dtype, ", got ",
                a.tensor.scalar_type());
    TORCH_CHECK(a.tensor.device() == bank.device(), "calibrated_sample: ", a.name, " is on ", a.tensor.device(),
                " but bank is on ", bank.device(), "; all tensors must be on one device");
  }
}

// One (source, slot) use of a class: its draws are rows s·R .. s·R + R−1 of the output.
struct Term {
  int64_t source;
  float scale;    // slot coefficient / √(N_k − 1)
  uint64_t base;  // first stream index of the slot
};

// E [rows, count] with row q = scale_q · normal(key_q, base_q + i), on the bank's device; sums [rows] its row
// sums (written only on CPU, where the fill computes them for free).
at::Tensor fill_rows(const std::vector<uint64_t>& keys, const std::vector<uint64_t>& bases,
                     const std::vector<float>& scales, int64_t count, const at::Tensor& like, float* sums) {
  const int64_t rows = static_cast<int64_t>(keys.size());
  at::Tensor e = at::empty({rows, count}, like.options().dtype(at::kFloat));
  if (like.is_cpu()) {
    float* p = e.data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const float sum = fill_normals(keys[q], bases[q], count, scales[q], p + q * count);
        if (sums != nullptr) sums[q] = sum;
      }
    });
    return e;
  }
#ifdef LTDIST_WITH_CUDA
  const auto host = at::TensorOptions().dtype(at::kLong);
  const at::Tensor k = at::from_blob(const_cast<uint64_t*>(keys.data()), {rows}, host).to(like.device());
  const at::Tensor b = at::from_blob(const_cast<uint64_t*>(bases.data()), {rows}, host).to(like.device());
  const at::Tensor s = at::from_blob(const_cast<float*>(scales.data()), {rows}, host.dtype(at::kFloat))
                           .to(like.device());
  fill_normals_cuda_launch(reinterpret_cast<const uint64_t*>(k.data_ptr<int64_t>()),
                           reinterpret_cast<const uint64_t*>(b.data_ptr<int64_t>()), s.data_ptr<float>(), rows,
                           count, e.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  return e;
#else
  TORCH_CHECK(false, "calibrated_sample: tensors on ", like.device(), " but ltdist._C was built without CUDA");
#endif
}

// p [rows, d] float32 = e [rows, n] · z [n, d] at the requested precision (fp32 accumulation).
at::Tensor class_gemm(const at::Tensor& e, const at::Tensor& z, Precision precision) {
  const bool bf16 = precision == Precision::kBf16;
  const at::Tensor a = bf16 ? e.to(at::kBFloat16) : e;
  if (!e.is_cpu()) return at::mm(a, bf16 ? z.to(at::kBFloat16) : z).to(at::kFloat);
  const int64_t d = z.size(1), blocks = (d + kColumnBlock - 1) / kColumnBlock;
  at::Tensor p = at::empty({e.size(0), d}, e.options());
  // at::parallel_for marks the region as parallel: each block's GEMM runs single-threaded in the BLAS
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kColumnBlock, width = std::min(kColumnBlock, d - c0);
      const at::Tensor zb = z.narrow(1, c0, width);
      at::Tensor pb = p.narrow(1, c0, width);  // row stride d: the BLAS writes it directly (ldc = d)
      if (bf16)
        pb.copy_(at::mm(a, zb.to(at::kBFloat16)));
      else
        at::mm_out(pb, a, zb);
    }
  });
  return p;
}

at::Tensor calibrated_sample_impl(const at::Tensor& bank_, const at::Tensor& offsets_, const at::Tensor& centres_,
                                  const at::Tensor& source_, const at::Tensor& source_class_,
                                  const at::Tensor& neighbours_, const at::Tensor& weights_, double alpha,
                                  double beta, int64_t R, int64_t seed, const std::optional<at::Tensor>& streams_,
                                  double beta_shared, c10::string_view precision_name) {
  const int64_t S = source_.dim() == 2 ? source_.size(0) : 0;
  const at::Tensor streams_in =
      streams_.has_value() ? *streams_ : at::arange(S, source_class_.options().dtype(at::kLong));
  check_inputs(bank_, offsets_, centres_, source_, source_class_, neighbours_, weights_, streams_in, R);
  const bool cuda = !bank_.is_cpu();
  const Precision precision = parse_precision(std::string(precision_name), cuda);
  const at::Tensor bank = bank_.contiguous(), centres = centres_.contiguous(), source = source_.contiguous();
  // the indices drive the grouping of the draws by class: small ([C+1], [S, M]), read on the host
  const at::Tensor offsets = offsets_.cpu().contiguous(), source_class = source_class_.cpu().contiguous(),
                   neighbours = neighbours_.cpu().contiguous(), weights = weights_.cpu().contiguous(),
                   streams = streams_in.cpu().contiguous();
  const int64_t M = neighbours.size(1), T = M + 1, d = bank.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* own = source_class.data_ptr<int64_t>();
  const int64_t* nb = neighbours.data_ptr<int64_t>();
  const int64_t* st = streams.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  const float a = static_cast<float>(alpha);

  std::vector<uint64_t> keys(static_cast<size_t>(S * R));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = 0; r < R; ++r)
      keys[s * R + r] = draw_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(st[s]), r);

  // class terms grouped by (class, pass): a class used twice by one source (repeated neighbours) goes to a
  // second pass, so that every group adds to distinct output rows
  std::map<std::pair<int64_t, int64_t>, std::vector<Term>> groups;
  std::vector<uint64_t> iso_base(static_cast<size_t>(S));
  std::vector<int64_t> seen(static_cast<size_t>(T));
  for (int64_t s = 0; s < S; ++s) {
    uint64_t base = 0;
    int64_t used = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t cls = t == 0 ? own[s] : nb[s * M + t - 1];
      const float coef = t == 0 ? 1.0f - a : a * std::sqrt(w[s * M + t - 1]);
      const int64_t n = off[cls + 1] - off[cls];
      if (n > 1 && coef != 0.0f) {  // one feature: no spread around the centre, no covariance
        int64_t pass = 0;
        for (int64_t u = 0; u < used; ++u) pass += seen[u] == cls;
        seen[used++] = cls;
        groups[{cls, pass}].push_back({s, coef / std::sqrt(static_cast<float>(n - 1)), base});
      }
      base += static_cast<uint64_t>(n);
    }
    iso_base[s] = base;
  }

  // μ = (1−α) z̃ + α Σ_m w_m ĉ_m in every draw, neighbour by neighbour (a fixed order)
  const at::Tensor nb_dev = neighbours_.contiguous(), w_dev = weights_.contiguous();
  at::Tensor mu = source * (1.0f - a);
  for (int64_t m = 0; m < M; ++m)
    mu.add_(centres.index_select(0, nb_dev.select(1, m)) * (w_dev.select(1, m) * a).unsqueeze(1));
  at::Tensor out = mu.unsqueeze(1).expand({S, R, d}).contiguous();
  at::Tensor flat = out.view({S * R, d});

  // √β ε and √β_s η·1 from the stream indices after the class terms
  const float sb = std::sqrt(static_cast<float>(beta)), ss = std::sqrt(static_cast<float>(beta_shared));
  if (sb > 0.0f || ss > 0.0f) {
    std::vector<uint64_t> bases(static_cast<size_t>(S * R));
    for (int64_t q = 0; q < S * R; ++q) bases[q] = iso_base[q / R];
    if (sb > 0.0f) flat.add_(fill_rows(keys, bases, std::vector<float>(keys.size(), sb), d, bank, nullptr));
    if (ss > 0.0f) {
      for (uint64_t& b : bases) b += static_cast<uint64_t>(d);
      flat.add_(fill_rows(keys, bases, std::vector<float>(keys.size(), ss), 1, bank, nullptr));
    }
  }

  for (const auto& [key, terms] : groups) {
    const int64_t cls = key.first, lo = off[cls], n = off[cls + 1] - lo;
    const int64_t rows = static_cast<int64_t>(terms.size()) * R;
    std::vector<uint64_t> row_keys(rows), row_bases(rows);
    std::vector<float> row_scales(rows);
    std::vector<int64_t> target(rows);
    for (size_t j = 0; j < terms.size(); ++j)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t q = static_cast<int64_t>(j) * R + r, s = terms[j].source;
        row_keys[q] = keys[s * R + r];
        row_bases[q] = terms[j].base;
        row_scales[q] = terms[j].scale;
        target[q] = s * R + r;
      }
    at::Tensor sums = at::empty({rows}, at::kFloat);
    at::Tensor e = fill_rows(row_keys, row_bases, row_scales, n, bank, cuda ? nullptr : sums.data_ptr<float>());
    if (precision == Precision::kBf16) e = e.to(at::kBFloat16).to(at::kFloat);  // centre what is multiplied
    if (cuda || precision == Precision::kBf16) sums = e.sum(1);
    at::Tensor p = class_gemm(e, bank.narrow(0, lo, n), precision);
    p.addr_(sums, centres.select(0, cls), 1.0, -1.0);  // − (Σ_i E_i) ĉ_kᵀ
    const at::Tensor index = at::from_blob(target.data(), {rows}, at::kLong).to(bank.device());
    flat.index_add_(0, index, p);
  }
  return out;
}

at::Tensor calibrated_sample_meta(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                                  const at::Tensor& source, const at::Tensor& source_class,
                                  const at::Tensor& neighbours, const at::Tensor& weights, double alpha,
                                  double beta, int64_t samples_per_source, int64_t seed,
                                  const std::optional<at::Tensor>& streams, double beta_shared,
                                  c10::string_view precision) {
  return at::empty({source.size(0), samples_per_source, bank.size(1)}, bank.options());
}

#ifdef LTDIST_WITH_CUDA
at::Tensor calibrated_sample_cuda(const at::Tensor& bank, const at::Tensor& offsets, const at::Tensor& centres,
                                  const at::Tensor& source, const at::Tensor& source_class,
                                  const at::Tensor& neighbours, const at::Tensor& weights, double alpha,
                                  double beta, int64_t samples_per_source, int64_t seed,
                                  const std::optional<at::Tensor>& streams, double beta_shared,
                                  c10::string_view precision) {
  const c10::cuda::CUDAGuard guard(bank.device());
  return calibrated_sample_impl(bank, offsets, centres, source, source_class, neighbours, weights, alpha, beta,
                                samples_per_source, seed, streams, beta_shared, precision);
}
#endif

}  // namespace
}  // namespace ltdist

TORCH_LIBRARY_FRAGMENT(ltdist, m) {
  m.def("calibrated_sample(Tensor bank, Tensor offsets, Tensor centres, Tensor source, Tensor source_class, "
        "Tensor neighbours, Tensor weights, float alpha, float beta, int samples_per_source, int seed, "
        "Tensor? streams=None, float beta_shared=0.0, str precision='fp32') -> Tensor");
}

TORCH_LIBRARY_IMPL(ltdist, CPU, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_impl); }

TORCH_LIBRARY_IMPL(ltdist, Meta, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_meta); }

#ifdef LTDIST_WITH_CUDA
TORCH_LIBRARY_IMPL(ltdist, CUDA, m) { m.impl("calibrated_sample", &ltdist::calibrated_sample_cuda); }
#endif
