// ATen binding of the raw-pointer CUDA kernels: builds the descriptor and
// chunk tables, uploads them in one copy, launches on the current stream and
// registers the kernels for CUDA tensors.  Arguments were validated by the
// Python checks shared with every backend.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "kernels.cuh"
#include "work_units.h"

namespace trust_fast {
namespace {

using trust_fast_cuda::AdamHyper;
using trust_fast_cuda::AdamTensor;
using trust_fast_cuda::DType;
using trust_fast_cuda::HutchTensor;
using trust_fast_cuda::RowChunk;
using trust_fast_cuda::SaliencyTensor;

inline int64_t rows_of(const at::Tensor& t) { return t.dim() > 0 ? t.size(0) : 1; }
inline int64_t width_of(const at::Tensor& t) {
  const int64_t r = rows_of(t);
  return r > 0 ? t.numel() / r : 0;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return trust_fast_cuda::kFloat32;
    case at::kHalf: return trust_fast_cuda::kFloat16;
    case at::kBFloat16: return trust_fast_cuda::kBFloat16;
    default: TORCH_CHECK(false, "trust_fast CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Elements per chunk: enough chunks to fill the GPU several times over, none tiny.
int64_t chunk_elems(const std::vector<int64_t>& items, const std::vector<int64_t>& widths) {
  int64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) total += items[i] * widths[i];
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 100;
  const int64_t target = total / (sms * 8);
  return target < 4096 ? 4096 : target > 65536 ? 65536 : target;
}

std::vector<RowChunk> make_chunks(const std::vector<int64_t>& items, const std::vector<int64_t>& widths) {
  std::vector<RowChunk> chunks;
  for (const WorkUnit& u : split_work(items, widths, chunk_elems(items, widths))) {
    chunks.push_back(RowChunk{u.tensor, 0, u.begin, u.end});
  }
  return chunks;
}

// Descriptors then chunks in one pinned buffer, copied to the device at once.
// The device buffer is freed stream-ordered after the launch, which is safe.
template <typename Desc>
struct Upload {
  at::Tensor device_buffer;
  const Desc* desc;
  const RowChunk* chunks;
};

template <typename Desc>
Upload<Desc> upload(const std::vector<Desc>& desc, const std::vector<RowChunk>& chunks, const at::Device& device) {
  const size_t desc_bytes = (desc.size() * sizeof(Desc) + 15) / 16 * 16;
  const size_t bytes = desc_bytes + chunks.size() * sizeof(RowChunk);
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<char*>(host.data_ptr());
  std::memcpy(h, desc.data(), desc.size() * sizeof(Desc));
  std::memcpy(h + desc_bytes, chunks.data(), chunks.size() * sizeof(RowChunk));
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  auto* d = static_cast<char*>(dev.data_ptr());
  return {dev, reinterpret_cast<const Desc*>(d), reinterpret_cast<const RowChunk*>(d + desc_bytes)};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "trust_fast CUDA ", what, " launch failed: ", cudaGetErrorString(err));
}

const DType kAllDtypes[] = {trust_fast_cuda::kFloat32, trust_fast_cuda::kFloat16, trust_fast_cuda::kBFloat16};

at::Tensor row_saliency_cuda(at::TensorList tensors, std::optional<at::TensorList> weights, c10::string_view mode) {
  const bool gw = mode == "gw";
  TORCH_CHECK(gw || mode == "g", "mode must be 'g' or 'gw'");
  TORCH_CHECK(!gw || weights.has_value(), "mode 'gw' needs weights");
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  int64_t total = 0;
  std::vector<int64_t> starts;
  for (const auto& g : tensors) {
    TORCH_CHECK(g.is_cuda() && g.is_contiguous(), "tensors must be contiguous CUDA tensors");
    starts.push_back(total);
    total += rows_of(g);
  }
  at::Tensor out = at::zeros({total}, tensors[0].options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (DType dt : kAllDtypes) {
    std::vector<SaliencyTensor> desc;
    std::vector<int64_t> items, widths;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& g = tensors[i];
      if (g.numel() == 0 || dtype_of(g) != dt) continue;
      const void* w = gw ? (*weights)[i].const_data_ptr() : nullptr;
      if (gw) {
        TORCH_CHECK((*weights)[i].is_contiguous() && (*weights)[i].sizes() == g.sizes() &&
                        (*weights)[i].scalar_type() == g.scalar_type(),
                    "weights[", i, "] must be contiguous with the shape and dtype of tensors[", i, "]");
      }
      const int64_t width = width_of(g);
      const bool vec = (width * static_cast<int64_t>(g.element_size())) % 16 == 0 && aligned(g.const_data_ptr(), 16) &&
                       (!gw || aligned(w, 16));
      desc.push_back(SaliencyTensor{g.const_data_ptr(), w, width, starts[i], vec ? 1 : 0, 0});
      items.push_back(rows_of(g));
      widths.push_back(width);
    }
    if (desc.empty()) continue;
    const auto chunks = make_chunks(items, widths);
    const auto up = upload(desc, chunks, out.device());
    check_launch(trust_fast_cuda::launch_row_saliency(dt, gw, up.desc, up.chunks, static_cast<int64_t>(chunks.size()),
                                                      out.data_ptr<float>(), stream),
                 "row_saliency");
  }
  return out;
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList steps, at::TensorList rows, at::TensorList slots, double lr, double beta1,
                       double beta2, double eps, double weight_decay, std::optional<at::TensorList> hess,
                       std::optional<at::TensorList> ref_params, double lam) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  rows.size() == n && slots.size() == n,
              "all tensor lists must have the length of params");
  TORCH_CHECK(hess.has_value() == ref_params.has_value(), "hess and ref_params go together");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const AdamHyper hp{lr, beta1, beta2, eps, weight_decay, lam};
  for (DType dt : kAllDtypes) {
    for (int penalty = 0; penalty < 3; ++penalty) {
      std::vector<AdamTensor> desc;
      std::vector<int64_t> items, widths;
      for (size_t i = 0; i < n; ++i) {
        const auto& p = params[i];
        if (rows[i].numel() == 0 || p.numel() == 0 || dtype_of(p) != dt) continue;
        const bool per_row = hess && (*hess)[i].numel() != p.numel();
        const int kind = !hess ? 0 : per_row ? 1 : 2;
        if (kind != penalty) continue;
        TORCH_CHECK(p.is_contiguous() && grads[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                        exp_avg_sqs[i].is_contiguous() && steps[i].scalar_type() == at::kFloat &&
                        exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat,
                    "params[", i, "], its grad and state must be contiguous (state float32)");
        const int64_t width = width_of(p);
        const int64_t vec_bytes = 4 * static_cast<int64_t>(p.element_size());
        const void* h = hess ? (*hess)[i].const_data_ptr() : nullptr;
        const bool h_bf16 = hess && (*hess)[i].scalar_type() == at::kBFloat16;
        TORCH_CHECK(!hess || h_bf16 || (*hess)[i].scalar_type() == at::kFloat, "hess[", i, "] must be float32 or bfloat16");
        const void* p0 = ref_params ? (*ref_params)[i].const_data_ptr() : nullptr;
        const bool vec = width % 4 == 0 && aligned(p.const_data_ptr(), vec_bytes) &&
                         aligned(grads[i].const_data_ptr(), vec_bytes) && aligned(exp_avgs[i].const_data_ptr(), 16) &&
                         aligned(exp_avg_sqs[i].const_data_ptr(), 16) && (p0 == nullptr || aligned(p0, vec_bytes)) &&
                         (kind != 2 || h_bf16 || aligned(h, 16));  // bfloat16 h: loaded per element
        desc.push_back(AdamTensor{p.data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].data_ptr<float>(),
                                  exp_avg_sqs[i].data_ptr<float>(), steps[i].data_ptr<float>(), h, p0,
                                  rows[i].const_data_ptr(), slots[i].const_data_ptr(), width,
                                  rows[i].scalar_type() == at::kInt ? 1 : 0, slots[i].scalar_type() == at::kInt ? 1 : 0,
                                  per_row ? 1 : 0, vec ? 1 : 0, h_bf16 ? 1 : 0, 0});
        items.push_back(rows[i].numel());
        widths.push_back(width);
      }
      if (desc.empty()) continue;
      const auto chunks = make_chunks(items, widths);
      const auto up = upload(desc, chunks, params[0].device());
      check_launch(trust_fast_cuda::launch_masked_adamw(dt, penalty, up.desc, up.chunks,
                                                        static_cast<int64_t>(chunks.size()), hp, stream),
                   "masked_adamw");
    }
  }
}

void hutchinson_diag_cuda(at::TensorList diags, at::TensorList hz, at::TensorList z, std::optional<at::TensorList> rows,
                          int64_t count) {
  const size_t n = diags.size();
  TORCH_CHECK(hz.size() == n && z.size() == n && (!rows || rows->size() == n),
              "all tensor lists must have the length of diags");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(diags[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (DType dt : kAllDtypes) {
    std::vector<HutchTensor> desc;
    std::vector<int64_t> items, widths;
    for (size_t i = 0; i < n; ++i) {
      const auto& h = hz[i];
      const int64_t n_items = rows ? (*rows)[i].numel() : rows_of(h);
      if (n_items == 0 || h.numel() == 0 || dtype_of(h) != dt) continue;
      const bool d_bf16 = diags[i].scalar_type() == at::kBFloat16;
      TORCH_CHECK(diags[i].is_contiguous() && (d_bf16 || diags[i].scalar_type() == at::kFloat) && h.is_contiguous() &&
                      z[i].is_contiguous() && z[i].scalar_type() == h.scalar_type(),
                  "diags[", i, "] must be contiguous float32 or bfloat16; hz[", i, "] and z[", i,
                  "] contiguous of one dtype");
      desc.push_back(HutchTensor{diags[i].data_ptr(), h.const_data_ptr(), z[i].const_data_ptr(),
                                 rows ? (*rows)[i].const_data_ptr() : nullptr, width_of(h),
                                 rows && (*rows)[i].scalar_type() == at::kInt ? 1 : 0,
                                 diags[i].sizes() != h.sizes() ? 1 : 0, d_bf16 ? 1 : 0, 0});
      items.push_back(n_items);
      widths.push_back(width_of(h));
    }
    if (desc.empty()) continue;
    const auto chunks = make_chunks(items, widths);
    const auto up = upload(desc, chunks, diags[0].device());
    check_launch(trust_fast_cuda::launch_hutchinson_diag(dt, up.desc, up.chunks, static_cast<int64_t>(chunks.size()),
                                                         static_cast<float>(static_cast<double>(count) / (count + 1)),
                                                         static_cast<float>(count + 1), stream),
                 "hutchinson_diag");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(trust_fast, CUDA, m) {
  m.impl("row_saliency_native", &row_saliency_cuda);
  m.impl("masked_adamw_native_", &masked_adamw_cuda);
  m.impl("hutchinson_diag_native_", &hutchinson_diag_cuda);
}

}  // namespace trust_fast
