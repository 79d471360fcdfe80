// Scattered rows vs contiguous rows, without torch: what the memory system
// alone charges MaskedAdamW for updating a random 5% of each tensor's rows.
//
// The tensors have the shapes of set a (the SD 1.5 attn2 to_q/to_k/to_v
// weights, benchmarks/sd15_shapes.py): 48 float32 tensors, 31.6M weights.
// For the same selected element count it times
//   - the AdamW row update (p, g read; p, m, v read and written; m and v
//     compact, one slot per selected row, as MaskedAdamW stores them) and
//   - a read-only pass over the same p and g rows,
// each on contiguous rows (the first 5% of every tensor) and on scattered
// rows (a random, sorted 5%), with and without software prefetch of the next
// row (what csrc/ops_cpu.cpp does).  Before every timed call a 512 MB buffer
// is read, so each call starts from DRAM as it does after a full AdamW step.
// A dense update of every row (dense m and v, as AdamW(fused) streams them)
// gives the ratio that #4's 10x target asks of the 5% update.  Medians of
// --repeats calls, interleaved round-robin.
//
//   g++ -O3 -march=native -fno-math-errno -fopenmp benchmarks/row_access.cpp -o /tmp/row_access
//   /tmp/row_access [--repeats 25] [--fraction 0.05] [--huge]
//
// --huge asks for 2 MB transparent huge pages (madvise) for every array.
// Built with -DROW_ACCESS_LIB -shared -fPIC it is instead a library with the
// scattered-row update alone (benchmarks/step_breakdown.py).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Tensor {
  int64_t rows, cols;
  float *p, *g, *m, *v;          // params, grads; state slots (one per selected row)
  float *m_all, *v_all;          // dense state of every row (the all-rows update)
  std::vector<int64_t> scattered; // sorted random row indices
};

[[maybe_unused]] float* alloc_floats(size_t n, bool huge) {
  constexpr size_t kAlign = size_t(2) << 20;
  const size_t bytes = (n * sizeof(float) + kAlign - 1) / kAlign * kAlign;
  void* ptr = std::aligned_alloc(kAlign, bytes);
  if (ptr == nullptr) {
    std::fprintf(stderr, "out of memory\n");
    std::exit(1);
  }
  if (huge) madvise(ptr, bytes, MADV_HUGEPAGE);
  float* f = static_cast<float*>(ptr);
  for (size_t i = 0; i < n; ++i) f[i] = 0.01f * static_cast<float>(i % 97);
  return f;
}

constexpr int64_t kBlock = 64;

// Requests the lines of elements [b, e) of the next row (as csrc/ops_cpu.cpp does, one
// block ahead of the update); p is requested for writing when the row is updated.
template <bool kWrite>
inline void prefetch_block(const float* next_p, const float* next_g, int64_t b, int64_t e) {
  if (next_p == nullptr) return;
  for (int64_t i = b; i < e; i += 16) {
    __builtin_prefetch(next_p + i, kWrite ? 1 : 0, 3);
    __builtin_prefetch(next_g + i, 0, 3);
  }
}

// AdamW on one row (torch.optim.AdamW's arithmetic, fixed hyperparameters).
template <bool kPrefetch>
void update_row(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, int64_t c,
                const float* next_p, const float* next_g) {
  const float decay = 0.99999f, one_m_b1 = 0.1f, beta2 = 0.999f, one_m_b2 = 0.001f, eps = 1e-8f, step = 1e-5f;
  for (int64_t b = 0; b < c; b += kBlock) {
    const int64_t e = std::min(b + kBlock, c);
    if (kPrefetch) prefetch_block<true>(next_p, next_g, b, e);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const float x = p[i], gi = g[i];
      const float mi = m[i] + one_m_b1 * (gi - m[i]);
      const float vi = beta2 * v[i] + one_m_b2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = x * decay - step * mi / (std::sqrt(vi) + eps);
    }
  }
}

template <bool kPrefetch>
float read_row(const float* __restrict p, const float* __restrict g, int64_t c, const float* next_p,
               const float* next_g) {
  float acc = 0.f;
  for (int64_t b = 0; b < c; b += kBlock) {
    const int64_t e = std::min(b + kBlock, c);
    if (kPrefetch) prefetch_block<false>(next_p, next_g, b, e);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += p[i] + g[i];
  }
  return acc;
}

struct Variant {
  const char* name;
  bool scattered, prefetch, read_only, all_rows;
};

volatile float g_sink;

template <bool kPrefetch>
void run(std::vector<Tensor>& ts, const Variant& var) {
  float acc = 0.f;
  for (Tensor& t : ts) {
    if (var.all_rows) {  // every row, dense state: one stream per array, as AdamW(fused) does
      update_row<false>(t.p, t.g, t.m_all, t.v_all, t.rows * t.cols, nullptr, nullptr);
      continue;
    }
    const int64_t n = static_cast<int64_t>(t.scattered.size()), c = t.cols;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = var.scattered ? t.scattered[k] : k;
      const float *np = nullptr, *ng = nullptr;
      if (k + 1 < n && var.scattered) {
        np = t.p + t.scattered[k + 1] * c;
        ng = t.g + t.scattered[k + 1] * c;
      }
      if (var.read_only) {
        acc += read_row<kPrefetch>(t.p + r * c, t.g + r * c, c, np, ng);
      } else {
        update_row<kPrefetch>(t.p + r * c, t.g + r * c, t.m + k * c, t.v + k * c, c, np, ng);
      }
    }
  }
  g_sink = acc;
}

}  // namespace

#ifdef ROW_ACCESS_LIB
// The scattered-row update above on caller-owned tensors (benchmarks/step_breakdown.py
// loads it with ctypes): tensor t has cols[t] columns; its counts[t] rows rows[t][k]
// use state slot k of m[t] and v[t].
extern "C" void row_access_update(int64_t n_tensors, float* const* p, const float* const* g, float* const* m,
                                  float* const* v, const int64_t* cols, const int64_t* counts,
                                  const int64_t* const* rows) {
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t c = cols[t], n = counts[t];
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = rows[t][k];
      const float* np = k + 1 < n ? p[t] + rows[t][k + 1] * c : nullptr;
      const float* ng = k + 1 < n ? g[t] + rows[t][k + 1] * c : nullptr;
      update_row<true>(p[t] + r * c, g[t] + r * c, m[t] + k * c, v[t] + k * c, c, np, ng);
    }
  }
}
#else
int main(int argc, char** argv) {
  int repeats = 25;
  double fraction = 0.05;
  bool huge = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--repeats" && i + 1 < argc) {
      repeats = std::atoi(argv[++i]);
    } else if (a == "--fraction" && i + 1 < argc) {
      fraction = std::atof(argv[++i]);
    } else if (a == "--huge") {
      huge = true;
    } else {
      std::fprintf(stderr, "usage: %s [--repeats N] [--fraction F] [--huge]\n", argv[0]);
      return 2;
    }
  }
  if (repeats < 1 || !(fraction > 0 && fraction <= 1)) {
    std::fprintf(stderr, "--repeats must be >= 1 and --fraction in (0, 1]\n");
    return 2;
  }
  // (rows, cols, count): set a of benchmarks/sd15_shapes.py
  const int64_t shapes[][3] = {{1280, 768, 12}, {320, 768, 10}, {640, 768, 10},
                               {1280, 1280, 6}, {320, 320, 5},  {640, 640, 5}};
  std::mt19937 rng(0);
  std::vector<Tensor> ts;
  int64_t weights = 0, selected = 0;
  for (const auto& s : shapes) {
    for (int64_t k = 0; k < s[2]; ++k) {
      Tensor t{s[0], s[1], nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, {}};
      const int64_t n = std::max<int64_t>(1, std::llround(fraction * static_cast<double>(t.rows)));
      t.p = alloc_floats(t.rows * t.cols, huge);
      t.g = alloc_floats(t.rows * t.cols, huge);
      t.m = alloc_floats(n * t.cols, huge);
      t.v = alloc_floats(n * t.cols, huge);
      t.m_all = alloc_floats(t.rows * t.cols, huge);
      t.v_all = alloc_floats(t.rows * t.cols, huge);
      std::vector<int64_t> all(t.rows);
      for (int64_t i = 0; i < t.rows; ++i) all[i] = i;
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(n);
      std::sort(all.begin(), all.end());
      t.scattered = all;
      weights += t.rows * t.cols;
      selected += n * t.cols;
      ts.push_back(t);
    }
  }
  const size_t flush_bytes = size_t(512) << 20;
  char* flush = static_cast<char*>(std::malloc(flush_bytes));
  std::memset(flush, 1, flush_bytes);

  const Variant variants[] = {
      {"update, every row (dense state)", false, false, false, true},
      {"update, contiguous rows", false, false, false, false},
      {"update, scattered rows", true, false, false, false},
      {"update, scattered rows, next-row prefetch", true, true, false, false},
      {"read p+g, contiguous rows", false, false, true, false},
      {"read p+g, scattered rows", true, false, true, false},
      {"read p+g, scattered rows, next-row prefetch", true, true, true, false},
  };
  constexpr int kVariants = sizeof(variants) / sizeof(variants[0]);
  std::vector<std::vector<double>> ms(kVariants);
  for (int rep = 0; rep < repeats + 1; ++rep) {  // the first round is a warm-up
    for (int v = 0; v < kVariants; ++v) {
      long sink = 0;
      for (size_t i = 0; i < flush_bytes; i += 64) sink += flush[i];
      g_sink = static_cast<float>(sink);
      const auto t0 = std::chrono::steady_clock::now();
      if (variants[v].prefetch) {
        run<true>(ts, variants[v]);
      } else {
        run<false>(ts, variants[v]);
      }
      const auto t1 = std::chrono::steady_clock::now();
      if (rep > 0) ms[v].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  std::printf("set a shapes: %zu tensors, %lld weights; %.0f%% of rows = %lld elements; %s pages; %d repeats\n",
              ts.size(), static_cast<long long>(weights), fraction * 100, static_cast<long long>(selected),
              huge ? "2 MB (madvise)" : "default", repeats);
  std::printf("%-46s %10s %10s %12s %14s\n", "variant", "median ms", "min ms", "vs contig.", "every row / x");
  double base[2] = {0, 0}, every = 0;
  for (int v = 0; v < kVariants; ++v) {
    std::sort(ms[v].begin(), ms[v].end());
    const double med = ms[v][ms[v].size() / 2];
    if (variants[v].all_rows) {
      every = med;
      std::printf("%-46s %10.3f %10.3f %12s %13.2fx\n", variants[v].name, med, ms[v][0], "-", 1.0);
      continue;
    }
    const int kind = variants[v].read_only ? 1 : 0;
    if (!variants[v].scattered) base[kind] = med;
    if (kind == 0) {
      std::printf("%-46s %10.3f %10.3f %11.2fx %13.2fx\n", variants[v].name, med, ms[v][0], med / base[kind], every / med);
    } else {
      std::printf("%-46s %10.3f %10.3f %11.2fx %14s\n", variants[v].name, med, ms[v][0], med / base[kind], "-");
    }
  }
  return 0;
}
#endif  // ROW_ACCESS_LIB
