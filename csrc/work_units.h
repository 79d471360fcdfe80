// Splitting row-wise work over many tensors into balanced units.
//
// A unit is a contiguous run of rows of one tensor holding about
// `target_elems` elements, so a static split of the unit list over threads
// is balanced even when row widths differ by orders of magnitude.
#pragma once

#include <cstdint>
#include <vector>

namespace trust_fast {

struct WorkUnit {
  int32_t tensor;  // index into the tensor list
  int64_t begin;   // first item (row, or position in a row list) of the unit
  int64_t end;     // one past the last item
};

// items[t] rows of width widths[t] elements each.
inline std::vector<WorkUnit> split_work(const std::vector<int64_t>& items,
                                        const std::vector<int64_t>& widths,
                                        int64_t target_elems = 1 << 15) {
  std::vector<WorkUnit> units;
  for (size_t t = 0; t < items.size(); ++t) {
    if (items[t] == 0) continue;
    const int64_t w = widths[t] > 0 ? widths[t] : 1;
    const int64_t per = target_elems / w > 0 ? target_elems / w : 1;
    for (int64_t b = 0; b < items[t]; b += per) {
      units.push_back({static_cast<int32_t>(t), b, b + per < items[t] ? b + per : items[t]});
    }
  }
  return units;
}

}  // namespace trust_fast
