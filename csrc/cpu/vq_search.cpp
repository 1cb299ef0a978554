// VQ column, C++ CPU kernels: the exhaustive nearest-code search of csrc/cpu/vq_search.h,
// shared by nearest_code, vector_quantize and residual_quantize (csrc/cpu/vq.cpp).
//
// Search. Codes are ranked by v_k = ||e_k||^2 - 2 x.e_k (||x||^2 is constant per row). The
// codebook is packed once per call into panels of kPanel codes (-2 e, exact since -2 is a
// power of two, stored [panel][j][code] so one panel row is two SIMD registers). A register
// tile of kTileRows rows x one panel is a GEMM microkernel: per j, two code vectors and one
// broadcast x value feed 2 x kTileRows FMAs into accumulators that never leave registers,
// for any D (faiss and at::mm write the (rows x codes) product to memory and scan it
// again). Threads split the rows into blocks; a block (kept in L2) passes over every
// panel (kept in L1), so memory is O(threads x block), never O(N x K).
//
// Each row keeps its best value, its index, its second best value and a threshold (see
// RowBest). A tile that beats no row's threshold (about 96% of tiles at K = 16384, two thirds
// at K = 512) costs one min and one compare per row; in the others, the rows that beat
// theirs are merged branch-free. D <= 16 unrolls the j loop and computes such a tile again
// out of line (cheaper than keeping its accumulators alive); larger D merges in place.
//
// Exactness. With large ||x|| the expansion loses digits: its rounding error is at most
// B = (D + 4) u (max ||e||^2 + 2 ||x|| max ||e||), u = 2^-24, when the norm is added to the
// dot product (any order) at the end, and (2D + 4) u (...) when it starts the sum (small D:
// each of the D roundings then applies to a partial sum bounded by the same max). When the second best v is more than 2B above the
// best, the best is the exact argmin; otherwise (ties, genuine or rounding-level near-ties,
// large norms) the row is searched again with the exact float32 (x - e)^2 over all codes,
// ties to the lowest index. An equal value arriving later makes the gap 0, so the order
// in which codes are absorbed never decides a tie. The returned sq_dist is always the
// exact float32 (x - e)^2 of the winner, never the expansion.
//
// At the x86-64 baseline (SSE2, no FMA: the register tiles below run at a quarter of the
// AVX-512 level's speed) a row block's products x.e come from ATen's GEMM instead, which
// dispatches at run time to the CPU's best ISA whatever this module's flags; SSE2 code then
// adds the norms and merges the values into the same row states. B above holds for any
// summation order, so the results stay bit-identical to the other levels.
//
// Non-finite input. A row of x with a NaN or inf has a NaN or inf bound, so it is always
// scanned exactly; a codebook with a NaN or inf (or a norm that overflows) skips the
// expansion and scans every row exactly. The exact scan ranks a NaN distance first (the
// first NaN code wins: torch.argmin's rule), so a NaN is never hidden, and ties, all-inf
// rows included, go to the lowest index.
#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"
#include "float_limits.h"
#include "vq_lanes.h"
#include "vq_search.h"

namespace fastvae {
namespace vq_search {
namespace {

using vq_lanes::any_lane;
using vq_lanes::horizontal_min;
using vq_lanes::kLanes;
using vq_lanes::lane_bits;
using vq_lanes::load;
using vq_lanes::splat;
using vq_lanes::VecF;
using vq_lanes::VecI;
using vq_lanes::vmin;

// Rows per register tile: 2 x 6 accumulators, 2 code vectors and 1 broadcast fill the 16
// AVX2 registers. SSE2 has no FMA: each product needs a register of its own, and 2 x 6
// accumulators spill there (measured 1.5x slower than 2 x 4 at D = 64).
#if defined(__AVX2__)
constexpr int kTileRows = 6;
#else
constexpr int kTileRows = 4;
#endif
static_assert(kRowBlock % kTileRows == 0, "a row block is whole register tiles");
constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24

// Exact float32 squared distance ||x - e||^2, or ||x||^2 when e is null (fixed summation
// order: the same bits every call).
inline float exact_sq_dist(const float* x, const float* e, int64_t d) {
  VecF acc = splat(0.f);
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    VecF diff = load(x + j);
    if (e) diff -= load(e + j);
    acc += diff * diff;
  }
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < d; ++j) {
    const float diff = e ? x[j] - e[j] : x[j];
    sum += diff * diff;
  }
  return sum;
}

// Merges a panel's values v0 (codes code0 + l), v1 (code0 + kLanes + l) into s: its two
// smallest, without a data-dependent branch (a panel that gets here is a coin flip).
__attribute__((always_inline)) inline void absorb_panel(RowBest& s, VecF v0, VecF v1, int32_t code0) {
  const float first = horizontal_min(vmin(v0, v1));
  const VecF splat_first = splat(first);
  const uint32_t at = lane_bits(v0 == splat_first) | lane_bits(v1 == splat_first) << kLanes;
  const int c = at ? __builtin_ctz(at) : 0;  // none only when first is NaN
  VecI lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  const VecF inf = splat(kInf);
  const float next = horizontal_min(vmin(lane == c ? inf : v0, lane + kLanes == c ? inf : v1));
  const bool better = first < s.best;
  const float second = better ? std::min(s.best, next) : std::min(s.second, first);
  const float best = std::min(s.best, first);
  s.index = better ? code0 + c : s.index;
  s.best = best, s.second = second, s.thr = std::min(second, best + s.slack);
}

// The expansion values of rows x[0 .. kTileRows) (row r at x + r * d) against one panel:
// acc[r][h] holds codes h * kLanes + l.
template <int kDim>
__attribute__((always_inline)) inline void tile_values(const float* x, int64_t d, const float* panel,
                                                       const float* sq_norm, VecF (&acc)[kTileRows][2]) {
  if constexpr (kDim > 0) d = kDim;
  // Small D: the norms start the sums (12 adds fewer, and a shorter path to the check, on
  // a tile of only 12 D FMAs); larger D adds them at the end.
  const VecF start0 = kDim > 0 ? load(sq_norm) : splat(0.f), start1 = kDim > 0 ? load(sq_norm + kLanes) : splat(0.f);
  for (int r = 0; r < kTileRows; ++r) acc[r][0] = start0, acc[r][1] = start1;
  auto step = [&](int64_t j) {
    const VecF e0 = load(panel + j * kPanel), e1 = load(panel + j * kPanel + kLanes);
    for (int r = 0; r < kTileRows; ++r) {
      const VecF xr = splat(x[r * d + j]);
      acc[r][0] += xr * e0;
      acc[r][1] += xr * e1;
    }
  };
  if constexpr (kDim > 0) {
#pragma GCC unroll 16
    for (int j = 0; j < kDim; ++j) step(j);
  } else {
#pragma GCC unroll 2
    for (int64_t j = 0; j < d; ++j) step(j);
    const VecF n0 = load(sq_norm), n1 = load(sq_norm + kLanes);
    for (int r = 0; r < kTileRows; ++r) acc[r][0] += n0, acc[r][1] += n1;
  }
}

// Merges a tile's values into the rows whose threshold they beat (usually one row; a
// value not below thr changes no decision, see RowBest).
__attribute__((always_inline)) inline void absorb_woken_rows(const VecF (&acc)[kTileRows][2], int32_t code0,
                                                             RowBest* state) {
  uint32_t woken = 0;
  for (int r = 0; r < kTileRows; ++r) woken |= any_lane(vmin(acc[r][0], acc[r][1]) < splat(state[r].thr)) << r;
  for (; woken; woken &= woken - 1) {
    const int r = __builtin_ctz(woken);
    absorb_panel(state[r], acc[r][0], acc[r][1], code0);
  }
}

// Small D: the rare tile that beats a threshold is computed again out of line, so the fast
// path need not keep (spill) its accumulators for it.
template <int kDim>
__attribute__((noinline)) void absorb_tile_again(const float* x, int64_t d, const float* panel, const float* sq_norm,
                                                 int32_t code0, RowBest* state) {
  VecF acc[kTileRows][2];
  tile_values<kDim>(x, d, panel, sq_norm, acc);
  absorb_woken_rows(acc, code0, state);
}

// Rows x[0 .. kTileRows) against the panel of codes [code0, code0 + kPanel). kDim is d when
// it is small enough to unroll completely, else 0.
template <int kDim>
__attribute__((always_inline)) inline void search_tile(const float* x, int64_t d, const float* panel,
                                                       const float* sq_norm, int32_t code0, RowBest* state) {
  VecF acc[kTileRows][2];
  tile_values<kDim>(x, d, panel, sq_norm, acc);
  VecI hit = VecI{};
  for (int r = 0; r < kTileRows; ++r) hit |= vmin(acc[r][0], acc[r][1]) < splat(state[r].thr);
  if (__builtin_expect(!any_lane(hit), 1)) return;
  if constexpr (kDim > 0) {
    absorb_tile_again<kDim>(x, d, panel, sq_norm, code0, state);
  } else {
    absorb_woken_rows(acc, code0, state);
  }
}

constexpr int kUnrolledMaxDim = 16;  // D up to this: a tile kernel with the j loop unrolled

// Rows [begin, end) of x as float32: a view of x itself when it is float32, else converted.
template <typename scalar_t>
const float* rows_as_float(const scalar_t* x, int64_t begin, int64_t end, int64_t dim, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x + begin * dim;
  } else {
    scratch.resize((end - begin) * dim);
    for (int64_t i = 0; i < (end - begin) * dim; ++i) scratch[i] = static_cast<float>(x[begin * dim + i]);
    return scratch.data();
  }
}

// Rounding bound B of a row's expansion values (see the top of the file).
inline double rounding_bound(const Codebook& cb, const float* xrow) {
  const double x_norm = std::sqrt(static_cast<double>(exact_sq_dist(xrow, nullptr, cb.dim)));
  const int64_t terms = cb.dim <= kUnrolledMaxDim ? 2 * cb.dim + 4 : cb.dim + 4;
  return terms * kUnitRoundoff * (cb.max_sq_norm + 2.0 * x_norm * cb.max_norm);
}

inline RowBest initial_state(const Codebook& cb, const float* xrow) {
  // slack > 2B even after float rounding of best + slack (|best| <= max ||e||^2 + 2 ||x|| max ||e||);
  // a non-finite bound (inf or NaN input) leaves thr = second.
  const double bound = rounding_bound(cb, xrow);
  const double slack = 2.0 * bound * (1.0 + 4.0 / (cb.dim + 4)) + std::numeric_limits<float>::min();
  return {kInf, kInf, kInf, slack < 1e30 ? static_cast<float>(slack) : kInf, 0};
}

// One row block (rows <= kRowBlock) against every panel: panels outermost so each stays
// in L1 while the block's tiles pass over it. A last partial tile reads a padded copy.
template <int kDim>
void search_block(const Codebook& cb, const float* xf, int64_t rows, std::vector<float>& pad, RowBest* state) {
  const int64_t d = cb.dim, full = rows / kTileRows * kTileRows;
  for (int64_t r = 0; r < rows; ++r) state[r] = initial_state(cb, xf + r * d);
  const float* tail = nullptr;
  RowBest tail_state[kTileRows];
  if (full < rows) {
    pad.resize(kTileRows * d);
    for (int64_t r = 0; r < kTileRows; ++r) {  // missing rows repeat the last one
      const int64_t src = std::min(full + r, rows - 1);
      std::memcpy(pad.data() + r * d, xf + src * d, d * sizeof(float));
      tail_state[r] = state[src];
    }
    tail = pad.data();
  }
  for (int64_t p = 0; p < cb.panels; ++p) {
    const float* panel = cb.packed.data() + p * d * kPanel;
    const float* sq_norm = cb.sq_norm.data() + p * kPanel;
    const auto code0 = static_cast<int32_t>(p * kPanel);
    for (int64_t r = 0; r < full; r += kTileRows)
      search_tile<kDim>(xf + r * d, d, panel, sq_norm, code0, state + r);
    if (tail) search_tile<kDim>(tail, d, panel, sq_norm, code0, tail_state);
  }
  for (int64_t r = full; r < rows; ++r) state[r] = tail_state[r - full];
}

template <size_t... Dims>
constexpr std::array<SearchBlock, sizeof...(Dims) + 1> block_kernels(std::index_sequence<Dims...>) {
  return {&search_block<0>, &search_block<static_cast<int>(Dims) + 1>...};
}

#if defined(__SSE2__) && !defined(__AVX2__)
#define FASTVAE_VQ_ATEN_GEMM 1
constexpr int64_t kGemmCodes = 512;  // codes per at::mm: a block's 252 x 512 products (504 KiB) stay in L2

// at::mm rounds every product in float32 (the exactness bound's premise) unless the user
// allowed oneDNN a lower precision for float32 matmuls; then the register tiles run.
inline bool aten_gemm_is_float32() {
  const auto precision = at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return precision != at::Float32Precision::BF16 && precision != at::Float32Precision::TF32;
}

// search_block with the products from at::mm (see the top of the file): per chunk of codes,
// `products` holds the block's (rows, kGemmCodes) x.e; the values ||e||^2 - 2 x.e (-2 x.e
// exact, the norm added last) are merged a panel at a time. Columns past a short last chunk
// are zeroed, so its padding codes get the value +inf (their norm) and never win.
void search_block_gemm(const Codebook& cb, const float* xf, int64_t rows, std::vector<float>& products,
                       RowBest* state) {
  const int64_t d = cb.dim;
  for (int64_t r = 0; r < rows; ++r) state[r] = initial_state(cb, xf + r * d);
  products.resize(kRowBlock * kGemmCodes);
  const at::Tensor x_rows = at::from_blob(const_cast<float*>(xf), {rows, d});
  const VecF minus_two = splat(-2.f);
  for (int64_t code0 = 0; code0 < cb.num_codes; code0 += kGemmCodes) {
    const int64_t chunk = std::min(kGemmCodes, cb.num_codes - code0);
    const int64_t padded = (chunk + kPanel - 1) / kPanel * kPanel;
    at::Tensor out = at::from_blob(products.data(), {rows, chunk}, {kGemmCodes, 1});
    // Views of raw memory (never the caller's codebook, which may require grad: mm_out refuses it).
    const at::Tensor codes = at::from_blob(const_cast<float*>(cb.code(code0)), {chunk, d});
    at::mm_out(out, x_rows, codes.t());
    const float* sq_norm = cb.sq_norm.data() + code0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* dot = products.data() + r * kGemmCodes;
      if (padded > chunk) std::fill(products.data() + r * kGemmCodes + chunk, products.data() + r * kGemmCodes + padded, 0.f);
      RowBest& s = state[r];
      for (int64_t q = 0; q < padded; q += kPanel) {
        const VecF v0 = load(sq_norm + q) + minus_two * load(dot + q);
        const VecF v1 = load(sq_norm + q + kLanes) + minus_two * load(dot + q + kLanes);
        if (__builtin_expect(any_lane(vmin(v0, v1) < splat(s.thr)), 0))
          absorb_panel(s, v0, v1, static_cast<int32_t>(code0 + q));
      }
    }
  }
}
#endif

}  // namespace

Codebook::Codebook(const at::Tensor& codebook)
    : num_codes(codebook.size(0)), dim(codebook.size(1)), panels((num_codes + kPanel - 1) / kPanel) {
  rows = codebook.to(at::kFloat).contiguous();
  const float* e = rows.data_ptr<float>();
  packed.assign(panels * dim * kPanel, 0.f);
  sq_norm.assign(panels * kPanel, kInf);
  for (int64_t k = 0; k < num_codes; ++k) {
    float* dst = packed.data() + (k / kPanel) * dim * kPanel + k % kPanel;
    float s = 0.f;
    for (int64_t j = 0; j < dim; ++j) {
      s += e[k * dim + j] * e[k * dim + j];
      dst[j * kPanel] = -2.f * e[k * dim + j];
    }
    sq_norm[k] = s;
    norms_finite = norms_finite && std::isfinite(s);
    max_sq_norm = std::max(max_sq_norm, static_cast<double>(s));
  }
  max_norm = std::sqrt(max_sq_norm);
}

// The block search of this call: ATen's GEMM at the baseline when it rounds in float32,
// else the register tiles (their j loop unrolled for D <= kUnrolledMaxDim).
SearchBlock block_search(int64_t d) {
  static constexpr auto kernels = block_kernels(std::make_index_sequence<kUnrolledMaxDim>());
#if defined(FASTVAE_VQ_ATEN_GEMM)
  if (aten_gemm_is_float32()) return &search_block_gemm;
#endif
  return kernels[d <= kUnrolledMaxDim ? d : 0];
}

void finish_row(const Codebook& cb, const float* xrow, const RowBest* s, int64_t* index_out, float* dist_out) {
  int64_t index = s ? s->index : 0;
  if (!s || !(static_cast<double>(s->second) - static_cast<double>(s->best) > 2.0 * rounding_bound(cb, xrow))) {
    float best = kInf;
    index = 0;
    for (int64_t k = 0; k < cb.num_codes; ++k) {
      const float dist = exact_sq_dist(xrow, cb.code(k), cb.dim);
      if (std::isnan(dist)) {
        index = k;
        break;
      }
      if (dist < best) best = dist, index = k;
    }
  }
  *index_out = index;
  *dist_out = exact_sq_dist(xrow, cb.code(index), cb.dim);
}

void nearest_codes(const at::Tensor& x, const at::Tensor& codebook, int64_t* indices, float* sq_dist) {
  const int64_t n = x.size(0), d = x.size(1);
  const Codebook cb(codebook);
  const SearchBlock search_block = block_search(d);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  FASTVAE_DISPATCH_FLOATS(x.scalar_type(), "nearest_code", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<float> scratch, pad;
      std::vector<RowBest> state(kRowBlock);
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t begin = block * kRowBlock, end = std::min(n, begin + kRowBlock), rows = end - begin;
        const float* xf = rows_as_float(xp, begin, end, d, scratch);
        if (cb.norms_finite) search_block(cb, xf, rows, pad, state.data());
        for (int64_t r = 0; r < rows; ++r)
          finish_row(cb, xf + r * d, cb.norms_finite ? &state[r] : nullptr, indices + begin + r, sq_dist + begin + r);
      }
    });
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  check_cpu(x, "x");
  check_cpu(codebook, "codebook");
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2 && x.size(1) == codebook.size(1),
              "nearest_code: x must be (N, D) and codebook (K, D)");
  TORCH_CHECK(codebook.size(0) >= 1 && codebook.size(0) <= std::numeric_limits<int32_t>::max() - 64,
              "nearest_code: the codebook needs 1 to 2^31 - 65 codes");  // int32 indices, padded panels
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "nearest_code: x and codebook must share a dtype");
}

}  // namespace vq_search
}  // namespace fastvae
