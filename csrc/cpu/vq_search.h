// VQ column: the exhaustive nearest-code search behind the forward entry points of
// csrc/cpu/vq.cpp (nearest_code, vector_quantize, residual_quantize). The kernels, and why
// their answers are exact, are in csrc/cpu/vq_search.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "vq_lanes.h"

namespace fastvae {
namespace vq_search {

constexpr int kPanel = 2 * vq_lanes::kLanes;  // codes per panel: two registers per row
constexpr int64_t kRowBlock = 252;  // rows per task, whole register tiles: 252 KiB of x at D = 256

// The codebook in float32, packed for the search, prepared once per call.
struct Codebook {
  int64_t num_codes, dim, panels;
  at::Tensor rows;             // (K, D) float32: exact values for the final distances
  std::vector<float> packed;   // (panels, D, kPanel) -2 e; padding codes are 0
  std::vector<float> sq_norm;  // (panels * kPanel) ||e_k||^2; +inf for padding codes, which never win
  double max_sq_norm = 0, max_norm = 0;
  bool norms_finite = true;  // false: every row is scanned exactly (see csrc/cpu/vq_search.cpp)

  explicit Codebook(const at::Tensor& codebook);
  const float* code(int64_t k) const { return rows.data_ptr<float>() + k * dim; }
};

// A row's search state. Only values below thr can change the answer: a new best, or a
// runner-up within slack (a bit over 2B) of the best; anything else is more than 2B above
// the final best and so never decides it. thr is best + slack once the best is known,
// far below second on most rows, so few panels wake the slow path.
struct RowBest {
  float best, second;  // the smallest value absorbed, and the next (may equal best)
  float thr, slack;
  int32_t index;  // the code of best
};

// Searches a row block (rows <= kRowBlock, float32, row r at xf + r * D) against every
// code with the expansion, leaving each row's state in state[r]; pad is scratch.
using SearchBlock = void (*)(const Codebook& cb, const float* xf, int64_t rows, std::vector<float>& pad,
                             RowBest* state);

// The block search for rows of dimension d (chosen once per call).
SearchBlock block_search(int64_t d);

// Finishes a row: the certain winner, or an exact float32 scan when the gap is within
// the expansion's rounding bound (or there is no search state `s`, as when the codebook's
// norms are not finite). Writes the code and its exact float32 squared distance.
void finish_row(const Codebook& cb, const float* xrow, const RowBest* s, int64_t* index_out, float* dist_out);

// Nearest code of every row of x (N, D): writes indices and float32 squared distances.
void nearest_codes(const at::Tensor& x, const at::Tensor& codebook, int64_t* indices, float* sq_dist);

// The shapes, devices, dtypes and codebook size the search takes.
void check_inputs(const at::Tensor& x, const at::Tensor& codebook);

}  // namespace vq_search
}  // namespace fastvae
