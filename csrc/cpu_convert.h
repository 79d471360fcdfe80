// Branch-free conversions between storage dtypes and float32, so the row
// loops that use them vectorise (c10's float->bfloat16 branches on NaN).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// Row loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time: the AdamW row update is compute-bound at SSE2 width.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define TF_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TF_SIMD_CLONES
#endif

namespace trust_fast {

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline c10::Half from_float<c10::Half>(float f) {
  return c10::Half(f);
}
// Round to nearest even, NaN -> canonical quiet NaN (same results as c10).
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

}  // namespace trust_fast
