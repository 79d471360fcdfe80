// Raw-pointer CUDA kernels of the trust_fast ops: no torch headers, so every
// .cu file compiles with plain nvcc (CI: nvcc -arch=sm_80 / sm_90 -c).
//
// Multi-tensor pattern: a table of per-tensor descriptors plus a table of
// chunks (a run of rows of one tensor, about the same number of elements
// each); one thread block per chunk, one warp per row.  Both tables travel to
// the device in one copy made by the caller.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace trust_fast_cuda {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowChunk {
  int32_t tensor;  // index into the descriptor table
  int32_t pad;
  int64_t begin;   // first item (row, or position in a row list)
  int64_t end;     // one past the last item
};

struct SaliencyTensor {
  const void* g;        // (rows, width) values
  const void* w;        // same shape, or nullptr in mode "g"
  int64_t width;        // elements per row
  int64_t out_start;    // index of this tensor's first row in the output
  int32_t vectorized;   // rows are 16-byte aligned and a whole number of 16-byte vectors
  int32_t pad;
};

struct AdamTensor {
  void* p;              // (rows, width) param, updated in place
  const void* g;        // gradient, param dtype
  float* m;             // (slots, width) first moment
  float* v;             // (slots, width) second moment
  float* step;          // (slots,) step counts
  const void* h;        // Hessian diagonal: (rows, width), (rows,) or nullptr; float32 or bfloat16
  const void* p0;       // reference params (param dtype) or nullptr
  const void* rows;     // (n,) row indices, int32 or int64
  const void* slots;    // (n,) slot indices, int32 or int64
  int64_t width;
  int32_t rows_int32;
  int32_t slots_int32;
  int32_t h_per_row;
  int32_t vectorized;   // width % 4 == 0 and every row 4-element aligned (16 bytes for float arrays)
  int32_t h_bf16;       // h holds bfloat16 (else float32); math in float32 either way
  int32_t pad;
};

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay, lam;
};

struct HutchTensor {
  void* d;              // (rows, width) per element or (rows,) per row; float32 or bfloat16
  const void* hz;       // (rows, width)
  const void* z;        // (rows, width), dtype of hz
  const void* rows;     // (n,) row indices or nullptr for all rows
  int64_t width;
  int32_t rows_int32;
  int32_t per_row;
  int32_t d_bf16;       // d holds bfloat16 (else float32), rounded once per store
  int32_t pad;
};

constexpr int kThreads = 256;  // 8 warps per block

// All tensors of one launch share the storage dtype; n_chunks blocks are launched.
cudaError_t launch_row_saliency(DType dtype, bool use_w, const SaliencyTensor* tensors, const RowChunk* chunks,
                                int64_t n_chunks, float* out, cudaStream_t stream);

// penalty: 0 none, 1 per-row Hessian diagonal, 2 per-element Hessian diagonal.
cudaError_t launch_masked_adamw(DType dtype, int penalty, const AdamTensor* tensors, const RowChunk* chunks,
                                int64_t n_chunks, AdamHyper hyper, cudaStream_t stream);

// d <- d * keep + z*hz / n_seen, with keep = count / (count + 1), n_seen = count + 1.
cudaError_t launch_hutchinson_diag(DType dtype, const HutchTensor* tensors, const RowChunk* chunks, int64_t n_chunks,
                                   float keep, float n_seen, cudaStream_t stream);

}  // namespace trust_fast_cuda
