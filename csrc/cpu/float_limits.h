// The float32 infinity and NaN the CPU kernels pad, mask and fill with.
#pragma once
#include <limits>

namespace fastvae {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

}  // namespace fastvae
