// CUDA kernels of row_saliency, masked_adamw_ and hutchinson_diag_ on raw
// pointers (see kernels.cuh).  float32 math whatever the storage dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.cuh"

namespace trust_fast_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The penalty's curvature max(h, 0), NaN kept (as the CPU kernel and torch.clamp)
__device__ __forceinline__ float curvature(float h) { return h < 0.f ? 0.f : h; }

// A Hessian diagonal stored as float32 or bfloat16 (the flag is uniform per tensor, so per warp)
__device__ __forceinline__ float load_diag(const void* d, int bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(d)[i]) : static_cast<const float*>(d)[i];
}
__device__ __forceinline__ void store_diag(void* d, int bf16, int64_t i, float x) {
  if (bf16) {
    static_cast<__nv_bfloat16*>(d)[i] = __float2bfloat16_rn(x);
  } else {
    static_cast<float*>(d)[i] = x;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ int64_t load_index(const void* idx, int32_t is_int32, int64_t k) {
  return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(idx)[k]) : static_cast<const int64_t*>(idx)[k];
}

// 16 bytes of T: 4 floats or 8 halves / bfloat16s.
template <typename T>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T x[kN];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {
  Vec16<T> v;
  *reinterpret_cast<uint4*>(v.x) = __ldg(reinterpret_cast<const uint4*>(p));
  return v;
}

// ---------------------------------------------------------------------------
// row_saliency: out[row] = mean |g| or mean |g * w| over the row

template <typename T, bool kUseW>
__global__ void __launch_bounds__(kThreads) row_saliency_kernel(const SaliencyTensor* __restrict__ tensors,
                                                                const RowChunk* __restrict__ chunks, float* out) {
  const RowChunk chunk = chunks[blockIdx.x];
  const SaliencyTensor t = tensors[chunk.tensor];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const T* g_base = static_cast<const T*>(t.g);
  const T* w_base = static_cast<const T*>(t.w);
  for (int64_t row = chunk.begin + warp; row < chunk.end; row += kWarps) {
    const T* g = g_base + row * t.width;
    const T* w = kUseW ? w_base + row * t.width : nullptr;
    float acc = 0.f;
    if (t.vectorized) {
      constexpr int kN = Vec16<T>::kN;
      const int64_t n_vec = t.width / kN;
      for (int64_t i = lane; i < n_vec; i += kWarp) {
        const Vec16<T> gv = load16(g + i * kN);
        if (kUseW) {
          const Vec16<T> wv = load16(w + i * kN);
#pragma unroll
          for (int j = 0; j < kN; ++j) acc += fabsf(to_f32(gv.x[j]) * to_f32(wv.x[j]));
        } else {
#pragma unroll
          for (int j = 0; j < kN; ++j) acc += fabsf(to_f32(gv.x[j]));
        }
      }
    } else {
      for (int64_t i = lane; i < t.width; i += kWarp) {
        const float x = to_f32(g[i]);
        acc += fabsf(kUseW ? x * to_f32(w[i]) : x);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) out[t.out_start + row] = acc / static_cast<float>(t.width);
  }
}

// ---------------------------------------------------------------------------
// masked_adamw: torch.optim.AdamW on listed rows, state in listed slots

struct AdamScalars {
  float step_size, bc2_sqrt, decay, one_m_b1, beta2, one_m_b2, eps, lam;
};

template <typename T, int kPenalty>  // 0 none, 1 per row, 2 per element
__device__ __forceinline__ void adam_element(T* p, const T* g, float* m, float* v, const void* h, int h_bf16,
                                             float h_row, const T* p0, int64_t i, const AdamScalars& s) {
  const float x = to_f32(p[i]);
  float gi = to_f32(g[i]);
  if (kPenalty == 1) gi += s.lam * h_row * (x - to_f32(p0[i]));
  if (kPenalty == 2) gi += s.lam * curvature(load_diag(h, h_bf16, i)) * (x - to_f32(p0[i]));
  const float mi = m[i] + s.one_m_b1 * (gi - m[i]);
  const float vi = s.beta2 * v[i] + s.one_m_b2 * gi * gi;
  m[i] = mi;
  v[i] = vi;
  const float denom = __fdiv_rn(__fsqrt_rn(vi), s.bc2_sqrt) + s.eps;
  p[i] = from_f32<T>(x * s.decay - __fdiv_rn(s.step_size * mi, denom));
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T x[4];
};

template <typename T, int kPenalty>
__device__ __forceinline__ void adam_vec4(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                                          float* __restrict__ v, const void* __restrict__ h, int h_bf16,
                                          float h_row, const T* __restrict__ p0, int64_t i, const AdamScalars& s) {
  Vec4<T> pv = *reinterpret_cast<const Vec4<T>*>(p + i);
  const Vec4<T> gv = *reinterpret_cast<const Vec4<T>*>(g + i);
  float4 mv = *reinterpret_cast<const float4*>(m + i);
  float4 vv = *reinterpret_cast<const float4*>(v + i);
  float mm[4] = {mv.x, mv.y, mv.z, mv.w};
  float vq[4] = {vv.x, vv.y, vv.z, vv.w};
  float hh[4] = {h_row, h_row, h_row, h_row};
  Vec4<T> p0v;
  if (kPenalty != 0) p0v = *reinterpret_cast<const Vec4<T>*>(p0 + i);
  if (kPenalty == 2 && h_bf16) {
#pragma unroll
    for (int j = 0; j < 4; ++j) hh[j] = curvature(load_diag(h, 1, i + j));
  } else if (kPenalty == 2) {
    const float4 hv = *reinterpret_cast<const float4*>(static_cast<const float*>(h) + i);
    hh[0] = curvature(hv.x); hh[1] = curvature(hv.y); hh[2] = curvature(hv.z); hh[3] = curvature(hv.w);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float x = to_f32(pv.x[j]);
    float gi = to_f32(gv.x[j]);
    if (kPenalty != 0) gi += s.lam * hh[j] * (x - to_f32(p0v.x[j]));
    mm[j] = mm[j] + s.one_m_b1 * (gi - mm[j]);
    vq[j] = s.beta2 * vq[j] + s.one_m_b2 * gi * gi;
    const float denom = __fdiv_rn(__fsqrt_rn(vq[j]), s.bc2_sqrt) + s.eps;
    pv.x[j] = from_f32<T>(x * s.decay - __fdiv_rn(s.step_size * mm[j], denom));
  }
  *reinterpret_cast<float4*>(m + i) = make_float4(mm[0], mm[1], mm[2], mm[3]);
  *reinterpret_cast<float4*>(v + i) = make_float4(vq[0], vq[1], vq[2], vq[3]);
  *reinterpret_cast<Vec4<T>*>(p + i) = pv;
}

template <typename T, int kPenalty>
__global__ void __launch_bounds__(kThreads) masked_adamw_kernel(const AdamTensor* __restrict__ tensors,
                                                                const RowChunk* __restrict__ chunks, AdamHyper hp) {
  const RowChunk chunk = chunks[blockIdx.x];
  const AdamTensor t = tensors[chunk.tensor];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int64_t k = chunk.begin + warp; k < chunk.end; k += kWarps) {
    const int64_t r = load_index(t.rows, t.rows_int32, k);
    const int64_t sl = load_index(t.slots, t.slots_int32, k);
    float step = 0.f;
    if (lane == 0) {
      step = t.step[sl] + 1.f;
      t.step[sl] = step;
    }
    step = __shfl_sync(0xffffffffu, step, 0);
    const double bc1 = 1.0 - pow(hp.beta1, static_cast<double>(step));
    const double bc2 = 1.0 - pow(hp.beta2, static_cast<double>(step));
    AdamScalars s;
    s.step_size = static_cast<float>(hp.lr / bc1);
    s.bc2_sqrt = static_cast<float>(sqrt(bc2));
    s.decay = static_cast<float>(1.0 - hp.lr * hp.weight_decay);
    s.one_m_b1 = static_cast<float>(1.0 - hp.beta1);
    s.beta2 = static_cast<float>(hp.beta2);
    s.one_m_b2 = static_cast<float>(1.0 - hp.beta2);
    s.eps = static_cast<float>(hp.eps);
    s.lam = static_cast<float>(hp.lam);
    T* p = static_cast<T*>(t.p) + r * t.width;
    const T* g = static_cast<const T*>(t.g) + r * t.width;
    const T* p0 = kPenalty ? static_cast<const T*>(t.p0) + r * t.width : nullptr;
    const void* h = nullptr;
    if (kPenalty == 2) {
      h = t.h_bf16 ? static_cast<const void*>(static_cast<const __nv_bfloat16*>(t.h) + r * t.width)
                   : static_cast<const void*>(static_cast<const float*>(t.h) + r * t.width);
    }
    const float h_row = kPenalty == 1 ? curvature(load_diag(t.h, t.h_bf16, r)) : 0.f;
    float* m = t.m + sl * t.width;
    float* v = t.v + sl * t.width;
    if (t.vectorized) {
      // four consecutive elements per lane: one vector load/store per array.  The
      // arrays never alias (__restrict__), so the unrolled iterations' loads are
      // issued together instead of one memory round trip per 128 elements.
#pragma unroll 4
      for (int64_t i = 4 * lane; i < t.width; i += 4 * kWarp) adam_vec4<T, kPenalty>(p, g, m, v, h, t.h_bf16, h_row, p0, i, s);
    } else {
      for (int64_t i = lane; i < t.width; i += kWarp) adam_element<T, kPenalty>(p, g, m, v, h, t.h_bf16, h_row, p0, i, s);
    }
  }
}

// ---------------------------------------------------------------------------
// hutchinson_diag: running mean of z * Hz per element or per row

template <typename T>
__global__ void __launch_bounds__(kThreads) hutchinson_kernel(const HutchTensor* __restrict__ tensors,
                                                              const RowChunk* __restrict__ chunks, float keep,
                                                              float n_seen) {
  const RowChunk chunk = chunks[blockIdx.x];
  const HutchTensor t = tensors[chunk.tensor];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  // keep = count/(count+1) is 0 only for count == 0 (else >= 1/2): the first sample stores the
  // estimate without reading d, so that a NaN/Inf start does not survive (NaN * 0 is NaN)
  const bool fresh = keep == 0.f;
  for (int64_t k = chunk.begin + warp; k < chunk.end; k += kWarps) {
    const int64_t r = t.rows ? load_index(t.rows, t.rows_int32, k) : k;
    const T* hz = static_cast<const T*>(t.hz) + r * t.width;
    const T* z = static_cast<const T*>(t.z) + r * t.width;
    if (t.per_row) {
      float acc = 0.f;
      for (int64_t i = lane; i < t.width; i += kWarp) acc += to_f32(z[i]) * to_f32(hz[i]);
      acc = warp_sum(acc);
      if (lane == 0) {
        const float est = acc / static_cast<float>(t.width);
        store_diag(t.d, t.d_bf16, r, fresh ? est : load_diag(t.d, t.d_bf16, r) * keep + __fdiv_rn(est, n_seen));
      }
    } else {
      const int64_t d0 = r * t.width;
      for (int64_t i = lane; i < t.width; i += kWarp) {
        const float est = to_f32(z[i]) * to_f32(hz[i]);
        store_diag(t.d, t.d_bf16, d0 + i,
                   fresh ? est : load_diag(t.d, t.d_bf16, d0 + i) * keep + __fdiv_rn(est, n_seen));
      }
    }
  }
}

template <typename T>
cudaError_t saliency_launch(bool use_w, const SaliencyTensor* tensors, const RowChunk* chunks, int64_t n_chunks,
                            float* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(n_chunks);
  if (use_w) {
    row_saliency_kernel<T, true><<<blocks, kThreads, 0, stream>>>(tensors, chunks, out);
  } else {
    row_saliency_kernel<T, false><<<blocks, kThreads, 0, stream>>>(tensors, chunks, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t adam_launch(int penalty, const AdamTensor* tensors, const RowChunk* chunks, int64_t n_chunks,
                        AdamHyper hp, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(n_chunks);
  switch (penalty) {
    case 0: masked_adamw_kernel<T, 0><<<blocks, kThreads, 0, stream>>>(tensors, chunks, hp); break;
    case 1: masked_adamw_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(tensors, chunks, hp); break;
    case 2: masked_adamw_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(tensors, chunks, hp); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t hutch_launch(const HutchTensor* tensors, const RowChunk* chunks, int64_t n_chunks, float keep,
                         float n_seen, cudaStream_t stream) {
  hutchinson_kernel<T><<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(tensors, chunks, keep, n_seen);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_saliency(DType dtype, bool use_w, const SaliencyTensor* tensors, const RowChunk* chunks,
                                int64_t n_chunks, float* out, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return saliency_launch<float>(use_w, tensors, chunks, n_chunks, out, stream);
    case kFloat16: return saliency_launch<__half>(use_w, tensors, chunks, n_chunks, out, stream);
    case kBFloat16: return saliency_launch<__nv_bfloat16>(use_w, tensors, chunks, n_chunks, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_masked_adamw(DType dtype, int penalty, const AdamTensor* tensors, const RowChunk* chunks,
                                int64_t n_chunks, AdamHyper hyper, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return adam_launch<float>(penalty, tensors, chunks, n_chunks, hyper, stream);
    case kFloat16: return adam_launch<__half>(penalty, tensors, chunks, n_chunks, hyper, stream);
    case kBFloat16: return adam_launch<__nv_bfloat16>(penalty, tensors, chunks, n_chunks, hyper, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_hutchinson_diag(DType dtype, const HutchTensor* tensors, const RowChunk* chunks, int64_t n_chunks,
                                   float keep, float n_seen, cudaStream_t stream) {
  if (n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case kFloat32: return hutch_launch<float>(tensors, chunks, n_chunks, keep, n_seen, stream);
    case kFloat16: return hutch_launch<__half>(tensors, chunks, n_chunks, keep, n_seen, stream);
    case kBFloat16: return hutch_launch<__nv_bfloat16>(tensors, chunks, n_chunks, keep, n_seen, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace trust_fast_cuda
