// CPU kernels (OpenMP through at::parallel_for) of the trust_fast native ops.
//
// Schemas are defined in Python (trust_fast/ops/schema.py); arguments are
// validated there by the checks shared with every backend.  The TORCH_CHECKs
// here only guard memory safety for direct callers of the *_native ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_convert.h"
#include "work_units.h"

// float32, float16 and bfloat16: the storage dtypes the op layer accepts.
#define TF_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace trust_fast {
namespace {

// Units per thread so that each thread gets at least ~256K elements: small
// calls run on the calling thread, without waking (and waiting for) the
// OpenMP team, which costs milliseconds on a busy machine.
int64_t units_per_thread(const std::vector<WorkUnit>& units, const std::vector<int64_t>& widths) {
  constexpr int64_t kMinElemsPerThread = 1 << 18;
  int64_t elems = 0;
  for (const WorkUnit& u : units) elems += (u.end - u.begin) * (widths[u.tensor] > 0 ? widths[u.tensor] : 1);
  const int64_t n = static_cast<int64_t>(units.size());
  if (elems <= kMinElemsPerThread) return n > 0 ? n : 1;
  const int64_t grain = (n * kMinElemsPerThread + elems - 1) / elems;
  return grain > 0 ? grain : 1;
}

// Runs fn(unit) for every work unit, the unit list split over OpenMP threads.
template <typename Fn>
void parallel_units(const std::vector<WorkUnit>& units, const std::vector<int64_t>& widths, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(units.size()), units_per_thread(units, widths), [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) fn(units[u]);
  });
}

inline int64_t rows_of(const at::Tensor& t) { return t.dim() > 0 ? t.size(0) : 1; }
inline int64_t width_of(const at::Tensor& t) {
  const int64_t r = rows_of(t);
  return r > 0 ? t.numel() / r : 0;
}

// Sum of |x| (or |x*w|) over n elements with float lanes per block and a double
// total, so long rows keep float32-accurate means.
template <typename T>
TF_SIMD_CLONES double abs_sum(const T* x, const T* w, int64_t n) {
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    float acc = 0.f;
    if (w == nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = b; i < e; ++i) acc += std::fabs(to_float(x[i]));
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = b; i < e; ++i) acc += std::fabs(to_float(x[i]) * to_float(w[i]));
    }
    total += acc;
  }
  return total;
}

at::Tensor row_saliency_cpu(at::TensorList tensors, std::optional<at::TensorList> weights, c10::string_view mode) {
  const bool gw = mode == "gw";
  TORCH_CHECK(gw || mode == "g", "mode must be 'g' or 'gw'");
  TORCH_CHECK(!gw || weights.has_value(), "mode 'gw' needs weights");
  std::vector<int64_t> rows, widths, offsets;
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& g = tensors[t];
    TORCH_CHECK(g.is_contiguous() && g.device().is_cpu(), "tensors[", t, "] must be a contiguous CPU tensor");
    if (gw) {
      const auto& w = (*weights)[t];
      TORCH_CHECK(w.is_contiguous() && w.sizes() == g.sizes() && w.scalar_type() == g.scalar_type(),
                  "weights[", t, "] must be contiguous with the shape and dtype of tensors[", t, "]");
    }
    rows.push_back(rows_of(g));
    widths.push_back(width_of(g));
    offsets.push_back(total);
    total += rows.back();
  }
  at::Tensor out = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  parallel_units(split_work(rows, widths), widths, [&](const WorkUnit& wu) {
    const auto& g = tensors[wu.tensor];
    const int64_t c = widths[wu.tensor];
    TF_DISPATCH_PARAM_TYPES(g.scalar_type(), "row_saliency_cpu", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* wp = gw ? (*weights)[wu.tensor].const_data_ptr<scalar_t>() : nullptr;
      for (int64_t r = wu.begin; r < wu.end; ++r) {
        const double s = c > 0 ? abs_sum(gp + r * c, wp ? wp + r * c : nullptr, c) / static_cast<double>(c) : 0.0;
        o[offsets[wu.tensor] + r] = static_cast<float>(s);
      }
    });
  });
  return out;
}

// An int32 or int64 index vector read through raw pointers: the row loops look up
// two indices per row, and a tensor call per lookup (dtype check, storage) cost
// 3-5% of a 5% AdamW step on set a (BENCHMARKS.md).
class Indices {
 public:
  explicit Indices(const at::Tensor& idx) {
    if (idx.scalar_type() == at::kInt) {
      i32_ = idx.const_data_ptr<int32_t>();
    } else {
      i64_ = idx.const_data_ptr<int64_t>();
    }
  }
  int64_t operator[](int64_t k) const { return i32_ != nullptr ? static_cast<int64_t>(i32_[k]) : i64_[k]; }

 private:
  const int32_t* i32_ = nullptr;
  const int64_t* i64_ = nullptr;
};

// Scalars rounded to float32 once, from double like torch.optim.AdamW does
// (1 - beta computed in double: 1 - float(0.9) is not float(0.1)).
struct AdamHyper {
  float decay, one_m_b1, beta2, one_m_b2, eps, lam;
};

enum Penalty { kNoPenalty = 0, kPerRowPenalty = 1, kPerElementPenalty = 2 };

// Rows given to the optimizer are scattered over the tensor: the hardware
// prefetcher only locks onto a row after its first misses, so each row's
// start is latency-bound.  While one row is updated, the next row's lines are
// requested, one block ahead per array (nullptr: the next row follows
// directly in memory, or there is none).
struct NextRow {
  const void* p = nullptr;  // params row (the grads row shares its offset)
  const void* g = nullptr;
  const float* m = nullptr;  // exp_avg slot (the exp_avg_sq slot shares its offset)
  const float* v = nullptr;
};

constexpr int64_t kLineBytes = 64;
constexpr int64_t kBlockElems = 64;

// The Hessian-diagonal penalty uses max(h, 0): a negative curvature estimate adds no penalty
// (it would push the weights away from the reference). NaN stays NaN, like torch.clamp.
inline float curvature(float h) { return h < 0.f ? 0.f : h; }

inline void prefetch_lines(const void* base, int64_t byte_begin, int64_t byte_end) {
  const char* b = static_cast<const char*>(base);
  for (int64_t off = byte_begin; off < byte_end; off += kLineBytes) __builtin_prefetch(b + off, 1, 3);
}

// One AdamW row update in float32, in torch.optim.AdamW's operation order,
// in one pass over p, g, m and v.  The penalty kind is a template argument so
// the loop has no branches and vectorises.
// H: the Hessian diagonal's storage type (float or BFloat16; math in float32).
template <typename T, int kPenalty, typename H>
TF_SIMD_CLONES void adamw_row(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
               const H* __restrict__ h, const T* __restrict__ p0, int64_t c, float step_size, float bc2_sqrt,
               const AdamHyper& hp, const NextRow& next) {
  const float decay = hp.decay, one_m_b1 = hp.one_m_b1, one_m_b2 = hp.one_m_b2;
  const float beta2 = hp.beta2, eps = hp.eps, lam = hp.lam;
  const float h_row = kPenalty == kPerRowPenalty ? curvature(to_float(h[0])) : 0.f;
  for (int64_t b = 0; b < c; b += kBlockElems) {
    const int64_t e = b + kBlockElems < c ? b + kBlockElems : c;
    if (next.p != nullptr) {
      prefetch_lines(next.p, b * sizeof(T), e * sizeof(T));
      prefetch_lines(next.g, b * sizeof(T), e * sizeof(T));
    }
    if (next.m != nullptr) {
      prefetch_lines(next.m, b * sizeof(float), e * sizeof(float));
      prefetch_lines(next.v, b * sizeof(float), e * sizeof(float));
    }
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const float x = to_float(p[i]);
      float gi = to_float(g[i]);
      if constexpr (kPenalty == kPerRowPenalty) gi += lam * h_row * (x - to_float(p0[i]));
      if constexpr (kPenalty == kPerElementPenalty) gi += lam * curvature(to_float(h[i])) * (x - to_float(p0[i]));
      const float mi = m[i] + one_m_b1 * (gi - m[i]);
      const float vi = beta2 * v[i] + one_m_b2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      const float denom = std::sqrt(vi) / bc2_sqrt + eps;
      p[i] = from_float<T>(x * decay - step_size * mi / denom);
    }
  }
}

template <typename T, typename H>
void adamw_row_any(T* p, const T* g, float* m, float* v, const H* h, bool h_per_row, const T* p0, int64_t c,
                   float step_size, float bc2_sqrt, const AdamHyper& hp, const NextRow& next) {
  if (h == nullptr) {
    adamw_row<T, kNoPenalty, H>(p, g, m, v, h, p0, c, step_size, bc2_sqrt, hp, next);
  } else if (h_per_row) {
    adamw_row<T, kPerRowPenalty, H>(p, g, m, v, h, p0, c, step_size, bc2_sqrt, hp, next);
  } else {
    adamw_row<T, kPerElementPenalty, H>(p, g, m, v, h, p0, c, step_size, bc2_sqrt, hp, next);
  }
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList rows, at::TensorList slots,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      std::optional<at::TensorList> hess, std::optional<at::TensorList> ref_params, double lam) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  rows.size() == n && slots.size() == n,
              "all tensor lists must have the length of params");
  TORCH_CHECK(hess.has_value() == ref_params.has_value(), "hess and ref_params go together");
  std::vector<int64_t> counts, widths;
  for (size_t t = 0; t < n; ++t) {
    const int64_t c = width_of(params[t]);
    TORCH_CHECK(params[t].is_contiguous() && grads[t].is_contiguous() && grads[t].numel() == params[t].numel(),
                "params[", t, "] and grads[", t, "] must be contiguous and of equal size");
    TORCH_CHECK(exp_avgs[t].is_contiguous() && exp_avg_sqs[t].is_contiguous() && exp_avgs[t].scalar_type() == at::kFloat &&
                    exp_avg_sqs[t].scalar_type() == at::kFloat && steps[t].scalar_type() == at::kFloat,
                "state of params[", t, "] must be contiguous float32");
    TORCH_CHECK(rows[t].numel() == slots[t].numel(), "rows[", t, "] and slots[", t, "] differ in length");
    TORCH_CHECK(exp_avgs[t].numel() == steps[t].numel() * c && exp_avg_sqs[t].numel() == exp_avgs[t].numel(),
                "state of params[", t, "] must hold steps[", t, "].numel() slots of the row width");
    counts.push_back(rows[t].numel());
    widths.push_back(c);
  }
  const AdamHyper hp{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                     static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                     static_cast<float>(lam)};
  parallel_units(split_work(counts, widths), widths, [&](const WorkUnit& wu) {
    const int64_t t = wu.tensor;
    const int64_t c = widths[t];
    const at::Tensor& p = params[t];
    float* m = exp_avgs[t].data_ptr<float>();
    float* v = exp_avg_sqs[t].data_ptr<float>();
    float* st = steps[t].data_ptr<float>();
    const int64_t n_rows = rows_of(p), n_slots = steps[t].numel();
    const void* h_raw = hess ? (*hess)[t].const_data_ptr() : nullptr;
    const bool h_bf16 = hess && (*hess)[t].scalar_type() == at::kBFloat16;
    TORCH_CHECK(!hess || h_bf16 || (*hess)[t].scalar_type() == at::kFloat, "hess[", t, "] must be float32 or bfloat16");
    const bool h_per_row = hess && (*hess)[t].numel() != p.numel();
    TF_DISPATCH_PARAM_TYPES(p.scalar_type(), "masked_adamw_cpu", [&] {
     // the diagonal's storage type: float32 or bfloat16
     auto run = [&](auto* h) {
      scalar_t* pp = p.data_ptr<scalar_t>();
      const scalar_t* gp = grads[t].const_data_ptr<scalar_t>();
      const scalar_t* p0 = ref_params ? (*ref_params)[t].const_data_ptr<scalar_t>() : nullptr;
      // rows selected together mostly share a step count: reuse the bias corrections
      float last_step = -1.f;
      double bc1 = 1.0, bc2 = 1.0;
      const Indices row_at(rows[t]), slot_at(slots[t]);
      int64_t r = wu.begin < wu.end ? row_at[wu.begin] : 0;
      int64_t s = wu.begin < wu.end ? slot_at[wu.begin] : 0;
      for (int64_t k = wu.begin; k < wu.end; ++k) {
        NextRow next;
        int64_t r_next = -1, s_next = -1;
        if (k + 1 < wu.end) {
          r_next = row_at[k + 1];
          s_next = slot_at[k + 1];
          if (r_next != r + 1) next.p = pp + r_next * c, next.g = gp + r_next * c;
          if (s_next != s + 1) next.m = m + s_next * c, next.v = v + s_next * c;
        }
        // the op layer validated the indices; this guards direct callers of the native op
        TORCH_CHECK(r >= 0 && r < n_rows && s >= 0 && s < n_slots, "row or slot index out of range");
        const float step = st[s] + 1.f;
        st[s] = step;
        if (step != last_step) {
          bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
          bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
          last_step = step;
        }
        adamw_row_any(pp + r * c, gp + r * c, m + s * c, v + s * c,
                      h ? (h_per_row ? h + r : h + r * c) : h, h_per_row, p0 ? p0 + r * c : nullptr, c,
                      static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)), hp, next);
        r = r_next;
        s = s_next;
      }
     };
     if (h_bf16) {
       run(static_cast<const c10::BFloat16*>(h_raw));
     } else {
       run(static_cast<const float*>(h_raw));
     }
    });
  });
}

// fresh (count == 0): store the estimate without reading d, so that a NaN/Inf start does
// not survive (NaN * 0 is NaN); est / 1 is est, the value the running mean would give.
// D: the diagonal's storage type (float or BFloat16, rounded once per store; math in float32).
template <typename T, typename D>
TF_SIMD_CLONES void running_mean_row(D* d, const T* z, const T* hz, int64_t c, float keep, float n_seen,
                                     bool fresh) {
  if (fresh) {
#pragma omp simd
    for (int64_t i = 0; i < c; ++i) d[i] = from_float<D>(to_float(z[i]) * to_float(hz[i]));
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) {
    const float est = to_float(z[i]) * to_float(hz[i]);
    d[i] = from_float<D>(to_float(d[i]) * keep + est / n_seen);
  }
}

void hutchinson_diag_cpu(at::TensorList diags, at::TensorList hz, at::TensorList z,
                         std::optional<at::TensorList> rows, int64_t count) {
  const size_t n = diags.size();
  TORCH_CHECK(hz.size() == n && z.size() == n && (!rows || rows->size() == n), "all tensor lists must have the length of diags");
  std::vector<int64_t> items, widths;
  for (size_t t = 0; t < n; ++t) {
    TORCH_CHECK(diags[t].is_contiguous() && (diags[t].scalar_type() == at::kFloat || diags[t].scalar_type() == at::kBFloat16),
                "diags[", t, "] must be contiguous float32 or bfloat16");
    TORCH_CHECK(hz[t].is_contiguous() && z[t].is_contiguous() && z[t].scalar_type() == hz[t].scalar_type() &&
                    z[t].numel() == hz[t].numel(),
                "hz[", t, "] and z[", t, "] must be contiguous with equal dtype and size");
    items.push_back(rows ? (*rows)[t].numel() : rows_of(hz[t]));
    widths.push_back(width_of(hz[t]));
  }
  const float n_seen = static_cast<float>(count + 1);
  const float keep = static_cast<float>(static_cast<double>(count) / static_cast<double>(count + 1));
  const bool fresh = count == 0;
  parallel_units(split_work(items, widths), widths, [&](const WorkUnit& wu) {
    const int64_t t = wu.tensor;
    const int64_t c = widths[t];
    void* d_raw = diags[t].data_ptr();
    const bool d_bf16 = diags[t].scalar_type() == at::kBFloat16;
    const bool per_row = diags[t].sizes() != hz[t].sizes();
    TF_DISPATCH_PARAM_TYPES(hz[t].scalar_type(), "hutchinson_diag_cpu", [&] {
     auto run = [&](auto* d) {
      using D = std::remove_pointer_t<decltype(d)>;
      const scalar_t* hp = hz[t].const_data_ptr<scalar_t>();
      const scalar_t* zp = z[t].const_data_ptr<scalar_t>();
      const std::optional<Indices> row_at = rows ? std::optional<Indices>(Indices((*rows)[t])) : std::nullopt;
      for (int64_t k = wu.begin; k < wu.end; ++k) {
        const int64_t r = row_at ? (*row_at)[k] : k;
        const scalar_t* hr = hp + r * c;
        const scalar_t* zr = zp + r * c;
        if (per_row) {
          double acc = 0.0;
          for (int64_t i = 0; i < c; ++i) acc += static_cast<double>(to_float(zr[i]) * to_float(hr[i]));
          const float est = static_cast<float>(acc / static_cast<double>(c));
          d[r] = from_float<D>(fresh ? est : to_float(d[r]) * keep + est / n_seen);
        } else {
          running_mean_row(d + r * c, zr, hr, c, keep, n_seen, fresh);
        }
      }
     };
     if (d_bf16) {
       run(static_cast<c10::BFloat16*>(d_raw));
     } else {
       run(static_cast<float*>(d_raw));
     }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(trust_fast, CPU, m) {
  m.impl("row_saliency_native", &row_saliency_cpu);
  m.impl("masked_adamw_native_", &masked_adamw_cpu);
  m.impl("hutchinson_diag_native_", &hutchinson_diag_cpu);
}

}  // namespace trust_fast
