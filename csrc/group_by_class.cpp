// group_by_class: stable counting sort of sample labels into a CSR layout.
//
// Given labels [N] (int64, each in [0, C)), returns
//   order   [N]   int64  indices of the samples, grouped by class, batch order kept inside a class
//   offsets [C+1] int64  samples of class c are order[offsets[c] : offsets[c+1]]
// This is the layout of the class-grouped feature bank used by the calibrated sampler.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

namespace ltdist {

std::tuple<at::Tensor, at::Tensor> group_by_class_cpu(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(labels.dim() == 1, "group_by_class: labels must be 1-D, got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "group_by_class: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(num_classes > 0, "group_by_class: num_classes must be positive, got ", num_classes);
  const at::Tensor lab = labels.contiguous();
  const int64_t n = lab.numel();
  const int64_t* l = lab.data_ptr<int64_t>();

  at::Tensor offsets = at::zeros({num_classes + 1}, lab.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = l[i];
    TORCH_CHECK(c >= 0 && c < num_classes, "group_by_class: label ", c, " at position ", i,
                " is outside [0, ", num_classes, ")");
    off[c + 1] += 1;
  }
  for (int64_t c = 0; c < num_classes; ++c) off[c + 1] += off[c];

  at::Tensor order = at::empty({n}, lab.options());
  int64_t* o = order.data_ptr<int64_t>();
  std::vector<int64_t> cursor(off, off + num_classes);
  for (int64_t i = 0; i < n; ++i) o[cursor[l[i]]++] = i;
  return {order, offsets};
}

#ifdef LTDIST_WITH_CUDA
// CUDA labels: the counting sort is sequential and the labels are small (one per sample), so it runs on
// the host and the result goes back to the labels' device. Registering it means every op has a CUDA kernel.
std::tuple<at::Tensor, at::Tensor> group_by_class_cuda(const at::Tensor& labels, int64_t num_classes) {
  auto [order, offsets] = group_by_class_cpu(labels.cpu(), num_classes);
  return {order.to(labels.device()), offsets.to(labels.device())};
}
#endif

// Shapes only: lets torch.compile / FakeTensor trace through the op.
std::tuple<at::Tensor, at::Tensor> group_by_class_meta(const at::Tensor& labels, int64_t num_classes) {
  return {at::empty_like(labels), at::empty({num_classes + 1}, labels.options())};
}

}  // namespace ltdist

TORCH_LIBRARY_FRAGMENT(ltdist, m) {
  m.def("group_by_class(Tensor labels, int num_classes) -> (Tensor order, Tensor offsets)");
}

TORCH_LIBRARY_IMPL(ltdist, CPU, m) {
  m.impl("group_by_class", &ltdist::group_by_class_cpu);
}

TORCH_LIBRARY_IMPL(ltdist, Meta, m) {
  m.impl("group_by_class", &ltdist::group_by_class_meta);
}

#ifdef LTDIST_WITH_CUDA
TORCH_LIBRARY_IMPL(ltdist, CUDA, m) {
  m.impl("group_by_class", &ltdist::group_by_class_cuda);
}
#endif
