// group_by_class: stable counting sort of sample labels into a CSR layout.
//
// Given labels [N] (int64, each in [0, C)), returns
//   order   [N]   int64  indices of the samples, grouped by class, batch order kept inside a class
//   offsets [C+1] int64  samples of class c are order[offsets[c] : offsets[c+1]]
// This is the layout of the class-grouped feature bank used by the calibrated sampler.
//
// permute_rows_(rows, order): rows[i] ← old rows[order[i]] in place (cycle by cycle, one row of scratch), so
// the grouped bank is built inside the loaded features instead of beside them.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
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

void permute_rows_cpu(const at::Tensor& rows, const at::Tensor& order_) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.is_cpu(),
              "permute_rows_: rows must be a contiguous 2-D CPU tensor, got ", rows.sizes());
  TORCH_CHECK(order_.dim() == 1 && order_.scalar_type() == at::kLong && order_.size(0) == rows.size(0),
              "permute_rows_: order must be int64 [", rows.size(0), "], got ", order_.scalar_type(), " ",
              order_.sizes());
  const at::Tensor order = order_.cpu().contiguous();
  const int64_t n = rows.size(0), bytes = rows.size(1) * static_cast<int64_t>(rows.element_size());
  const int64_t* o = order.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(n), false);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(o[i] >= 0 && o[i] < n && !seen[o[i]], "permute_rows_: order is not a permutation of 0..", n - 1,
                " (entry ", i, " = ", o[i], ")");
    seen[o[i]] = true;
  }
  std::fill(seen.begin(), seen.end(), false);  // now: rows already in their place
  char* base = static_cast<char*>(rows.data_ptr());
  std::vector<char> scratch(static_cast<size_t>(bytes));
  for (int64_t start = 0; start < n; ++start) {
    if (seen[start] || o[start] == start) continue;
    std::memcpy(scratch.data(), base + start * bytes, bytes);
    int64_t j = start;
    while (o[j] != start) {  // row j takes row o[j], then o[j] is the next hole
      std::memcpy(base + j * bytes, base + o[j] * bytes, bytes);
      seen[j] = true;
      j = o[j];
    }
    std::memcpy(base + j * bytes, scratch.data(), bytes);
    seen[j] = true;
  }
}

#ifdef LTDIST_WITH_CUDA
// Device memory holds the bank, not the loaded features (they arrive on the host): a gathered copy is fine.
void permute_rows_cuda(const at::Tensor& rows, const at::Tensor& order) {
  TORCH_CHECK(rows.dim() == 2 && order.dim() == 1 && order.size(0) == rows.size(0),
              "permute_rows_: rows must be [N, d] and order [N], got ", rows.sizes(), " and ", order.sizes());
  rows.copy_(rows.index_select(0, order.to(rows.device())));
}
#endif

void permute_rows_meta(const at::Tensor& rows, const at::Tensor& order) {}

// Shapes only: lets torch.compile / FakeTensor trace through the op.
std::tuple<at::Tensor, at::Tensor> group_by_class_meta(const at::Tensor& labels, int64_t num_classes) {
  return {at::empty_like(labels), at::empty({num_classes + 1}, labels.options())};
}

}  // namespace ltdist

TORCH_LIBRARY_FRAGMENT(ltdist, m) {
  m.def("group_by_class(Tensor labels, int num_classes) -> (Tensor order, Tensor offsets)");
  m.def("permute_rows_(Tensor(a!) rows, Tensor order) -> ()");
}

TORCH_LIBRARY_IMPL(ltdist, CPU, m) {
  m.impl("group_by_class", &ltdist::group_by_class_cpu);
  m.impl("permute_rows_", &ltdist::permute_rows_cpu);
}

TORCH_LIBRARY_IMPL(ltdist, Meta, m) {
  m.impl("group_by_class", &ltdist::group_by_class_meta);
  m.impl("permute_rows_", &ltdist::permute_rows_meta);
}

#ifdef LTDIST_WITH_CUDA
TORCH_LIBRARY_IMPL(ltdist, CUDA, m) {
  m.impl("group_by_class", &ltdist::group_by_class_cuda);
  m.impl("permute_rows_", &ltdist::permute_rows_cuda);
}
#endif
