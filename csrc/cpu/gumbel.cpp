// Gumbel column, C++ CPU kernels: gumbel_softmax (soft and hard) and its backward (from
// the seed, or from the soft sample); the categorical KL is in gumbel_kl.cpp. The noise
// of element (row, c) is lane c % 4 of Philox quad c / 4 of `row` (reference.py), made
// kWideLanes quads or kLanes rows at a time (simd.h: 16 and 8 at the AVX-512 level, 8 with
// AVX2, 4 at the baseline) and never stored.
//
// Two loop shapes, chosen by layout:
// * rows_in_lanes: `dim` last and contiguous, K >= 4 kWideLanes. One row at a time; the
//   vector lanes are kWideLanes consecutive quads (4 kWideLanes columns), interleaved into
//   column order.
// * rows_across_lanes: anything else (`dim` not last, e.g. (B, K, H, W) with dim=1, or
//   narrow K). kLanes rows at a time, one per lane; for `dim` not last those rows are
//   adjacent in memory, so every column is one contiguous vector load and store.
// Softmax is online: one sweep over the columns makes z = logits + noise, the running max
// and the sum, storing exp((z - running max) / tau) and the max of each chunk; a second
// sweep over that cached row rescales. Centring z before scaling by 1 / tau (clamped to
// [FLT_MIN, FLT_MAX]) keeps every tau > 0 finite. A row holding a NaN or +inf logit (some
// z not below +inf: one compare per vector, folded into the sweep) is written all NaN,
// as torch.softmax gives; the max and the argmax are not trusted with NaN. Backward runs
// the same sweeps, also accumulating sum(grad * e).
// Backward from the sample (the soft sample y is the saved output) needs no noise and no
// exp: the same loop shapes read y and grad once into the row cache, one sweep takes
// sum(grad * y), a second writes y * (grad - sum) / tau.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "float_limits.h"
#include "rows.h"
#include "simd.h"

namespace fastvae {
namespace {

using simd::kLanes;
using simd::VecF;
using simd::VecI;
using simd::VecU;
using simd::kWideLanes;
using WideF = simd::Wide::F;
using WideI = simd::Wide::I;

enum class Mode { kSoft, kHard, kBackward, kBackwardFromSample };

constexpr int kWideChunk = 4 * kWideLanes;  // columns per step of rows_in_lanes (kWideLanes quads)
constexpr int kTileChunk = 16;          // columns per online-softmax step of rows_across_lanes

struct GumbelProblem {
  uint64_t seed;
  float inv_tau;
  int64_t rows, classes;
  RowLayout x, grad, out;
};

// ---------------------------------------------------------------- rows_in_lanes
template <typename scalar_t, Mode mode>
void rows_in_lanes(const GumbelProblem& p, const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t row,
                   float* buf, float* grad_buf, float* chunk_max) {
  const int64_t K = p.classes, chunks = (K + kWideChunk - 1) / kWideChunk, padded = chunks * kWideChunk;
  load_row(x + p.x.offset(row), 1, K, padded, -kInf, buf);
  scalar_t* out_row = out + p.out.offset(row);
  if (mode == Mode::kHard) {
    // Per-slot running argmax of logits + noise; a strict > keeps the lowest column.
    WideF best[4];
    WideI best_col[4], finite = ~WideI{};
    for (int v = 0; v < 4; ++v) best[v] = WideF{} - kInf, best_col[v] = WideI{} - 1;
    for (int64_t j = 0; j < chunks; ++j) {
      WideF noise[4];
      simd::gumbel_noise_of_chunk(p.seed, row, j, noise);
      for (int v = 0; v < 4; ++v) {
        const WideF z = simd::load<WideF>(buf + kWideChunk * j + kWideLanes * v) + noise[v];
        finite &= z < kInf;
        const WideI better = z > best[v];
        best[v] = simd::select(better, z, best[v]);
        const int32_t first_col = static_cast<int32_t>(kWideChunk * j + kWideLanes * v);
        best_col[v] = simd::select(better, simd::lane_index<WideI>() + first_col, best_col[v]);
      }
    }
    float top = -kInf;
    int64_t top_col = -1;
    for (int v = 0; v < 4; ++v)
      for (int lane = 0; lane < kWideLanes; ++lane)
        if (best[v][lane] > top || (best[v][lane] == top && best_col[v][lane] < top_col && best_col[v][lane] >= 0))
          top = best[v][lane], top_col = best_col[v][lane];
    const bool nan_row = simd::lane_bits(finite) != (1u << kWideLanes) - 1;
    std::fill(out_row, out_row + K, static_cast<scalar_t>(nan_row ? kNaN : 0.0f));
    if (top_col >= 0 && !nan_row) out_row[top_col] = static_cast<scalar_t>(1.0f);
    return;
  }
  if (mode == Mode::kBackward) load_row(grad + p.grad.offset(row), p.grad.class_stride, K, padded, 0.0f, grad_buf);
  float running_max = -FLT_MAX;  // finite, so exp(running_max - new max) never sees inf - inf
  WideF sum{}, grad_dot{};
  WideI finite = ~WideI{};
  for (int64_t j = 0; j < chunks; ++j) {
    WideF noise[4], z[4];
    simd::gumbel_noise_of_chunk(p.seed, row, j, noise);
    float* chunk = buf + kWideChunk * j;
    for (int v = 0; v < 4; ++v) {
      z[v] = simd::load<WideF>(chunk + kWideLanes * v) + noise[v];
      finite &= z[v] < kInf;
    }
    const float top = simd::horizontal_max(simd::max(simd::max(z[0], z[1]), simd::max(z[2], z[3])));
    if (top > running_max) {
      const float rescale = std::exp((running_max - top) * p.inv_tau);
      sum *= rescale;
      grad_dot *= rescale;
      running_max = top;
    }
    chunk_max[j] = running_max;
    for (int v = 0; v < 4; ++v) {
      const WideF e = vecmath::exp_nonpositive((z[v] - running_max) * p.inv_tau);
      simd::store(chunk + kWideLanes * v, e);
      sum += e;
      if (mode == Mode::kBackward) grad_dot += e * simd::load<WideF>(grad_buf + kWideChunk * j + kWideLanes * v);
    }
  }
  const float total = simd::horizontal_sum(sum);
  // An all -inf row gives zeros, a NaN row NaN.
  const float inv_sum = simd::lane_bits(finite) != (1u << kWideLanes) - 1 ? kNaN : total > 0.0f ? 1.0f / total : 0.0f;
  const float dot = simd::horizontal_sum(grad_dot) * inv_sum;
  float scaled_max = std::nanf(""), scale = 0.0f;
  for (int64_t j = 0; j < chunks; ++j) {
    if (chunk_max[j] != scaled_max)
      scaled_max = chunk_max[j], scale = std::exp((chunk_max[j] - running_max) * p.inv_tau) * inv_sum;
    float* chunk = buf + kWideChunk * j;
    for (int v = 0; v < 4; ++v) {
      const WideF y = simd::load<WideF>(chunk + kWideLanes * v) * scale;
      if (mode == Mode::kSoft) {
        simd::store(chunk + kWideLanes * v, y);
      } else {
        const WideF g = simd::load<WideF>(grad_buf + kWideChunk * j + kWideLanes * v);
        simd::store(chunk + kWideLanes * v, y * (g - dot) * p.inv_tau);
      }
    }
  }
  for (int64_t c = 0; c < K; ++c) out_row[c] = static_cast<scalar_t>(buf[c]);
}

// The softmax backward y * (grad - sum(grad * y)) * inv_tau of one row of y (`x` of the
// problem); both rows are cached padded with zeros, which add nothing to the sum.
template <typename scalar_t>
void from_sample_in_lanes(const GumbelProblem& p, const scalar_t* y, const scalar_t* grad, scalar_t* out, int64_t row,
                          float* buf, float* grad_buf) {
  const int64_t K = p.classes, padded = (K + kLanes - 1) / kLanes * kLanes;
  load_row(y + p.x.offset(row), 1, K, padded, 0.0f, buf);
  load_row(grad + p.grad.offset(row), p.grad.class_stride, K, padded, 0.0f, grad_buf);
  VecF grad_dot{};
  for (int64_t c = 0; c < padded; c += kLanes) grad_dot += simd::load(buf + c) * simd::load(grad_buf + c);
  const float dot = simd::horizontal_sum(grad_dot);
  for (int64_t c = 0; c < padded; c += kLanes)
    simd::store(buf + c, simd::load(buf + c) * (simd::load(grad_buf + c) - dot) * p.inv_tau);
  scalar_t* out_row = out + p.out.offset(row);
  for (int64_t c = 0; c < K; ++c) out_row[c] = static_cast<scalar_t>(buf[c]);
}

// ---------------------------------------------------------------- rows_across_lanes
// Element offsets of kLanes rows starting at `first` (rows past the end repeat the last
// row: they recompute and rewrite its values, which is harmless); `contiguous` when the
// kLanes are consecutive in memory.
struct LaneOffsets {
  int64_t at[kLanes];
  bool contiguous;
  LaneOffsets(const RowLayout& layout, int64_t first, int64_t rows) {
    contiguous = true;
    for (int lane = 0; lane < kLanes; ++lane) {
      at[lane] = layout.offset(std::min(first + lane, rows - 1));
      contiguous = contiguous && at[lane] == at[0] + lane;
    }
  }
};

template <typename scalar_t>
void load_tile(const scalar_t* src, const LaneOffsets& lanes, int64_t stride, int64_t n, int64_t padded, float pad,
               float* tile) {
  for (int64_t c = 0; c < n; ++c) {
    float* column = tile + c * kLanes;
    if (lanes.contiguous) {
      const scalar_t* s = src + lanes.at[0] + c * stride;
      for (int lane = 0; lane < kLanes; ++lane) column[lane] = static_cast<float>(s[lane]);
    } else {
      for (int lane = 0; lane < kLanes; ++lane) column[lane] = static_cast<float>(src[lanes.at[lane] + c * stride]);
    }
  }
  std::fill(tile + n * kLanes, tile + padded * kLanes, pad);
}

template <typename scalar_t>
void store_tile(const float* tile, const LaneOffsets& lanes, int64_t stride, int64_t n, scalar_t* dst) {
  for (int64_t c = 0; c < n; ++c) {
    const float* column = tile + c * kLanes;
    if (lanes.contiguous) {
      scalar_t* d = dst + lanes.at[0] + c * stride;
      for (int lane = 0; lane < kLanes; ++lane) d[lane] = static_cast<scalar_t>(column[lane]);
    } else {
      for (int lane = 0; lane < kLanes; ++lane) dst[lanes.at[lane] + c * stride] = static_cast<scalar_t>(column[lane]);
    }
  }
}

template <typename scalar_t, Mode mode>
void rows_across_lanes(const GumbelProblem& p, const scalar_t* x, const scalar_t* grad, scalar_t* out, int64_t first,
                       float* tile, float* grad_tile, VecF* chunk_max) {
  const int64_t K = p.classes, chunks = (K + kTileChunk - 1) / kTileChunk, padded = chunks * kTileChunk;
  const LaneOffsets x_lanes(p.x, first, p.rows), out_lanes(p.out, first, p.rows);
  load_tile(x, x_lanes, p.x.class_stride, K, padded, -kInf, tile);
  VecU row_lo, row_hi;
  for (int lane = 0; lane < kLanes; ++lane) {
    const uint64_t row = static_cast<uint64_t>(std::min(first + lane, p.rows - 1));
    row_lo[lane] = static_cast<uint32_t>(row), row_hi[lane] = static_cast<uint32_t>(row >> 32);
  }
  // z = logits + noise of the 16 columns of chunk j, one vector (kLanes rows) per column.
  auto perturbed_chunk = [&](int64_t j, VecF z[kTileChunk]) {
    for (int quad = 0; quad < kTileChunk / 4; ++quad) {
      VecU bits[4];
      simd::philox(p.seed, simd::splat_u(static_cast<uint32_t>(kTileChunk / 4 * j + quad)), row_lo, row_hi, bits);
      for (int k = 0; k < 4; ++k) {
        const int64_t c = kTileChunk * j + 4 * quad + k;
        z[4 * quad + k] = simd::load(tile + c * kLanes) + simd::gumbel_from_bits(bits[k]);
      }
    }
  };
  VecI finite = ~VecI{};  // the lanes whose z are all below +inf
  if (mode == Mode::kHard) {
    VecF best = simd::splat(-kInf);
    VecI best_col = VecI{} - 1;
    for (int64_t j = 0; j < chunks; ++j) {
      VecF z[kTileChunk];
      perturbed_chunk(j, z);
      for (int k = 0; k < kTileChunk; ++k) {
        finite &= z[k] < kInf;
        const VecI better = z[k] > best;  // strict: ties keep the lowest column
        best = simd::select(better, z[k], best);
        best_col = simd::select(better, VecI{} + static_cast<int32_t>(kTileChunk * j + k), best_col);
      }
    }
    std::fill(tile, tile + K * kLanes, 0.0f);
    for (int lane = 0; lane < kLanes; ++lane) {
      if (!finite[lane]) {
        for (int64_t c = 0; c < K; ++c) tile[c * kLanes + lane] = kNaN;
      } else if (best_col[lane] >= 0) {
        tile[best_col[lane] * kLanes + lane] = 1.0f;
      }
    }
    store_tile(tile, out_lanes, p.out.class_stride, K, out);
    return;
  }
  if (mode == Mode::kBackward) {
    const LaneOffsets grad_lanes(p.grad, first, p.rows);
    load_tile(grad, grad_lanes, p.grad.class_stride, K, padded, 0.0f, grad_tile);
  }
  VecF running_max = simd::splat(-FLT_MAX), sum{}, grad_dot{};
  for (int64_t j = 0; j < chunks; ++j) {
    VecF z[kTileChunk];
    perturbed_chunk(j, z);
    VecF top = running_max;
    for (int k = 0; k < kTileChunk; ++k) {
      top = simd::max(top, z[k]);
      finite &= z[k] < kInf;
    }
    const VecF rescale = vecmath::exp_nonpositive((running_max - top) * p.inv_tau);
    sum *= rescale;
    grad_dot *= rescale;
    running_max = chunk_max[j] = top;
    for (int k = 0; k < kTileChunk; ++k) {
      float* column = tile + (kTileChunk * j + k) * kLanes;
      const VecF e = vecmath::exp_nonpositive((z[k] - running_max) * p.inv_tau);
      simd::store(column, e);
      sum += e;
      if (mode == Mode::kBackward) grad_dot += e * simd::load(grad_tile + (kTileChunk * j + k) * kLanes);
    }
  }
  // All -inf rows give zeros, NaN rows NaN.
  const VecF inv_sum = simd::select(finite, simd::select(sum > 0.0f, 1.0f / sum, VecF{}), simd::splat(kNaN));
  const VecF dot = grad_dot * inv_sum;
  for (int64_t j = 0; j < chunks; ++j) {
    const VecF scale = vecmath::exp_nonpositive((chunk_max[j] - running_max) * p.inv_tau) * inv_sum;
    for (int k = 0; k < kTileChunk; ++k) {
      float* column = tile + (kTileChunk * j + k) * kLanes;
      const VecF y = simd::load(column) * scale;
      if (mode == Mode::kSoft) {
        simd::store(column, y);
      } else {
        const VecF g = simd::load(grad_tile + (kTileChunk * j + k) * kLanes);
        simd::store(column, y * (g - dot) * p.inv_tau);
      }
    }
  }
  store_tile(tile, out_lanes, p.out.class_stride, K, out);
}

// from_sample_in_lanes for the kLanes rows starting at `first`, one per lane.
template <typename scalar_t>
void from_sample_across_lanes(const GumbelProblem& p, const scalar_t* y, const scalar_t* grad, scalar_t* out,
                              int64_t first, float* tile, float* grad_tile) {
  const int64_t K = p.classes;
  const LaneOffsets y_lanes(p.x, first, p.rows), grad_lanes(p.grad, first, p.rows), out_lanes(p.out, first, p.rows);
  load_tile(y, y_lanes, p.x.class_stride, K, K, 0.0f, tile);
  load_tile(grad, grad_lanes, p.grad.class_stride, K, K, 0.0f, grad_tile);
  VecF dot{};
  for (int64_t c = 0; c < K; ++c) dot += simd::load(tile + c * kLanes) * simd::load(grad_tile + c * kLanes);
  for (int64_t c = 0; c < K; ++c) {
    float* column = tile + c * kLanes;
    simd::store(column, simd::load(column) * (simd::load(grad_tile + c * kLanes) - dot) * p.inv_tau);
  }
  store_tile(tile, out_lanes, p.out.class_stride, K, out);
}

// ---------------------------------------------------------------- dispatch
template <typename scalar_t, Mode mode>
void run_gumbel(const GumbelProblem& p, const scalar_t* x, const scalar_t* grad, scalar_t* out) {
  const int64_t K = p.classes;
  const bool reads_grad = mode == Mode::kBackward || mode == Mode::kBackwardFromSample;
  const bool lanes_are_columns = p.x.inner == 1 && p.x.class_stride == 1 && K >= kWideChunk;
  if (lanes_are_columns) {
    const int64_t chunks = (K + kWideChunk - 1) / kWideChunk;
    at::parallel_for(0, p.rows, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(chunks * kWideChunk), grad_buf(reads_grad ? chunks * kWideChunk : 0);
      std::vector<float> chunk_max(chunks);
      for (int64_t row = begin; row < end; ++row) {
        if constexpr (mode == Mode::kBackwardFromSample)
          from_sample_in_lanes<scalar_t>(p, x, grad, out, row, buf.data(), grad_buf.data());
        else
          rows_in_lanes<scalar_t, mode>(p, x, grad, out, row, buf.data(), grad_buf.data(), chunk_max.data());
      }
    });
    return;
  }
  const int64_t chunks = (K + kTileChunk - 1) / kTileChunk, padded = chunks * kTileChunk;
  const int64_t blocks = (p.rows + kLanes - 1) / kLanes;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / K), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(padded * kLanes), grad_tile(reads_grad ? padded * kLanes : 0);
    std::vector<VecF> chunk_max(chunks);
    for (int64_t block = begin; block < end; ++block) {
      if constexpr (mode == Mode::kBackwardFromSample)
        from_sample_across_lanes<scalar_t>(p, x, grad, out, block * kLanes, tile.data(), grad_tile.data());
      else
        rows_across_lanes<scalar_t, mode>(p, x, grad, out, block * kLanes, tile.data(), grad_tile.data(),
                                          chunk_max.data());
    }
  });
}

// `x` is the logits, or the soft sample y for kBackwardFromSample (then `seed` is unused).

at::Tensor gumbel(const at::Tensor& x_in, const at::Tensor* grad_y, uint64_t seed, const at::Tensor& tau_t,
                  Mode mode, int64_t dim) {
  const double tau = read_tau(tau_t);
  auto out = empty_output(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (x_in.numel() == 0) return out;
  at::Tensor x = x_in, grad = grad_y ? *grad_y : at::Tensor();
  // 1 / tau within [FLT_MIN, FLT_MAX]: every tau > 0 computes (reference.inverse_tau).
  const float inv_tau =
      static_cast<float>(std::clamp(1.0 / tau, static_cast<double>(FLT_MIN), static_cast<double>(FLT_MAX)));
  GumbelProblem p{seed, inv_tau, 0, x_in.size(dim),
                  row_layout(x, dim), grad_y ? row_layout(grad, dim) : RowLayout{}, row_layout(out, dim)};
  p.rows = x_in.numel() / p.classes;
  FASTVAE_DISPATCH_FLOATS(x_in.scalar_type(), "gumbel_softmax", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y ? grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    switch (mode) {
      case Mode::kSoft: run_gumbel<scalar_t, Mode::kSoft>(p, xp, gp, op); break;
      case Mode::kHard: run_gumbel<scalar_t, Mode::kHard>(p, xp, gp, op); break;
      case Mode::kBackward: run_gumbel<scalar_t, Mode::kBackward>(p, xp, gp, op); break;
      case Mode::kBackwardFromSample: run_gumbel<scalar_t, Mode::kBackwardFromSample>(p, xp, gp, op); break;
    }
  });
  return out;
}

void check_grad_y(const at::Tensor& grad_y, const at::Tensor& like, const char* what) {
  check_cpu(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == like.sizes() && grad_y.scalar_type() == like.scalar_type(), what);
}

}  // namespace

at::Tensor gumbel_softmax(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& tau, bool hard, int64_t dim) {
  check_cpu(logits, "logits");
  return gumbel(logits, nullptr, read_seed(seed), tau, hard ? Mode::kHard : Mode::kSoft, dim);
}

at::Tensor gumbel_softmax_backward(const at::Tensor& grad_y, const at::Tensor& logits, const at::Tensor& seed,
                                   const at::Tensor& tau, int64_t dim) {
  check_cpu(logits, "logits");
  check_grad_y(grad_y, logits, "gumbel_softmax_backward: grad_y must have the logits' shape and dtype");
  return gumbel(logits, &grad_y, read_seed(seed), tau, Mode::kBackward, dim);
}

at::Tensor gumbel_softmax_backward_from_sample(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& tau,
                                               int64_t dim) {
  check_cpu(y, "y");
  check_grad_y(grad_y, y, "gumbel_softmax_backward_from_sample: grad_y must have y's shape and dtype");
  return gumbel(y, &grad_y, 0, tau, Mode::kBackwardFromSample, dim);
}

}  // namespace fastvae
