// VQ column, C++ CPU kernels: exhaustive nearest-code search, vector_quantize forward and
// backward.
//
// Search. Codes are ranked by v_k = ||e_k||^2 - 2 x.e_k (||x||^2 is constant per row), a
// block of rows against a tile of codes at a time, so memory is O(threads x block x tile),
// never O(N x K). Two paths compute v:
//   * small D: a fused SIMD kernel, one row per SIMD lane, x held in registers for the
//     whole code range, each code's D values broadcast (D a template parameter so the
//     dot unrolls); a GEMM of inner size D <= 16 would spend its time writing and
//     re-reading the (block x tile) product instead of computing.
//   * larger D: at::mm of a row block against a code tile (float32, -2 folded into the
//     codebook once, exact since it is a power of two) into a per-thread buffer that
//     stays in L2, then a scan adding ||e||^2. Threads split the rows.
// Each row keeps the best v, its index and the second best v (GEMM path: per SIMD lane,
// merged at the end with ties to the lowest index).
//
// Exactness. With large ||x|| the expansion loses digits: its rounding error is at most
// B = (D + 4) u (max ||e||^2 + 2 ||x|| max ||e||), u = 2^-24. When the second best v is
// more than 2B above the best, the best is the exact argmin; otherwise (genuine or
// rounding-level near-ties, large norms) the row is searched again with the exact
// float32 (x - e)^2 over all codes, ties to the lowest index. The returned sq_dist is
// always the exact float32 (x - e)^2 of the winner, never the expansion.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common.h"
#include "../ops.h"

namespace fastvae {
namespace {

// One SIMD register of floats: GCC lowers wider vector types badly (through the stack).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// GCC/Clang vector types; aligned(4) makes plain dereference an unaligned load.
typedef float VecF __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef int32_t VecI __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));

constexpr int64_t kFusedMaxDim = 16;   // D up to this uses the fused kernel
constexpr int64_t kRowBlock = 256;     // rows per task
constexpr int64_t kTileBytes = 1 << 18;  // codebook tile (fused) / product buffer (GEMM) per task
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24

inline VecF splat(float v) { return VecF{} + v; }

inline VecI lane_iota() {
  VecI out;
  for (int l = 0; l < kLanes; ++l) out[l] = l;
  return out;
}

// Exact float32 squared distance ||x - e||^2, or ||x||^2 when e is null (fixed summation
// order: the same bits every call).
inline float exact_sq_dist(const float* x, const float* e, int64_t d) {
  VecF acc = splat(0.f);
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    VecF diff = *reinterpret_cast<const VecF*>(x + j);
    if (e) diff -= *reinterpret_cast<const VecF*>(e + j);
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

// The running per-lane search state of one row.
struct RowState {
  VecF best, second;
  VecI index;
  void reset() {
    best = second = splat(kInf);
    index = VecI{} + 0;
  }
  // Lane l sees codes base + l; strict < keeps the lowest index of equal values.
  inline void update(VecF v, VecI codes) {
    auto better = v < best;
    second = better ? best : (v < second ? v : second);
    best = better ? v : best;
    index = better ? codes : index;
  }
};

struct Winner {
  int64_t index;
  float best, gap;  // best expansion value, second best minus best
};

inline Winner merge_lanes(const RowState& s) {
  float best = kInf;
  int32_t index = std::numeric_limits<int32_t>::max();
  int winner_lane = 0;
  for (int l = 0; l < kLanes; ++l)
    if (s.best[l] < best || (s.best[l] == best && s.index[l] < index)) best = s.best[l], index = s.index[l], winner_lane = l;
  float second = kInf;
  for (int l = 0; l < kLanes; ++l) second = std::min(second, l == winner_lane ? s.second[l] : s.best[l]);
  if (best == kInf) index = 0;  // only when every value is inf/NaN: argmin of garbage, keep it in range
  return {index, best, second - best};
}

// The codebook in float32 with what both search paths need, prepared once per call.
struct Codebook {
  int64_t num_codes, dim;
  at::Tensor rows;            // (K, D) float32: exact values for re-ranking
  at::Tensor minus2;          // (K, D) -2 * rows
  std::vector<float> sq_norm;  // (K) ||e_k||^2 in float32
  double max_sq_norm = 0, max_norm = 0;

  explicit Codebook(const at::Tensor& codebook)
      : num_codes(codebook.size(0)), dim(codebook.size(1)) {
    rows = codebook.to(at::kFloat).contiguous();
    const float* e = rows.data_ptr<float>();
    sq_norm.resize(num_codes);
    for (int64_t k = 0; k < num_codes; ++k) {
      float s = 0.f;
      for (int64_t j = 0; j < dim; ++j) s += e[k * dim + j] * e[k * dim + j];
      sq_norm[k] = s;
      max_sq_norm = std::max(max_sq_norm, static_cast<double>(s));
    }
    max_norm = std::sqrt(max_sq_norm);
    minus2 = rows * -2.0;
  }
  const float* code(int64_t k) const { return rows.data_ptr<float>() + k * dim; }
};

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

// Fused small-D kernel: the rows of one SIMD register (lane l: row l, stored transposed
// as xt[j * kLanes + l]) absorb codes [k0, k1), four codes' dot products in flight at a
// time (4 measured fastest on AVX2; skipping the bookkeeping when no lane improves was
// slower, not faster).
template <int D>
void fused_search_rows(const Codebook& cb, const float* xt, int64_t k0, int64_t k1, RowState& state) {
  constexpr int kUnroll = 4;
  VecF x[D];
  for (int j = 0; j < D; ++j) x[j] = *reinterpret_cast<const VecF*>(xt + j * kLanes);
  const float* em2 = cb.minus2.data_ptr<float>();
  const float* sq_norm = cb.sq_norm.data();
  VecF best = state.best, second = state.second;
  VecI index = state.index;
  auto expansion = [&](int64_t code) {  // ||e||^2 - 2 x.e for every lane, in two FMA chains
    const float* e = em2 + code * D;
    VecF even = VecF{} + sq_norm[code], odd = VecF{};
    for (int j = 0; j < D; j += 2) {
      even += e[j] * x[j];
      if (j + 1 < D) odd += e[j + 1] * x[j + 1];
    }
    return even + odd;
  };
  auto absorb = [&](VecF v, int64_t code) {
    auto better = v < best;  // strict: ties keep the lower index
    index = better ? (VecI{} + static_cast<int32_t>(code)) : index;
    VecF displaced = best < v ? v : best;  // max(best, v)
    second = displaced < second ? displaced : second;
    best = better ? v : best;
  };
  int64_t k = k0;
  for (; k + kUnroll <= k1; k += kUnroll) {
    VecF v[kUnroll];
    for (int u = 0; u < kUnroll; ++u) v[u] = expansion(k + u);
    for (int u = 0; u < kUnroll; ++u) absorb(v[u], k + u);
  }
  for (; k < k1; ++k) absorb(expansion(k), k);
  state.best = best, state.second = second, state.index = index;
}

using FusedSearchRows = void (*)(const Codebook&, const float*, int64_t, int64_t, RowState&);

template <size_t... Dims>
constexpr std::array<FusedSearchRows, sizeof...(Dims)> fused_kernels(std::index_sequence<Dims...>) {
  return {&fused_search_rows<static_cast<int>(Dims) + 1>...};
}

// Fused path over one row block: code tiles outermost so a tile stays in L2 while every
// group of kLanes rows passes over it.
void fused_search_block(const Codebook& cb, const float* xf, int64_t rows, int64_t tile_codes,
                        std::vector<float>& transposed, std::vector<RowState>& states, Winner* winners) {
  static constexpr auto kernels = fused_kernels(std::make_index_sequence<kFusedMaxDim>());
  const FusedSearchRows kernel = kernels[cb.dim - 1];
  const int64_t d = cb.dim, groups = (rows + kLanes - 1) / kLanes;
  transposed.resize(groups * d * kLanes);
  for (int64_t g = 0; g < groups; ++g) {
    states[g].reset();
    for (int64_t l = 0; l < kLanes; ++l) {  // missing rows repeat the last one (never read back)
      const float* row = xf + std::min(g * kLanes + l, rows - 1) * d;
      for (int64_t j = 0; j < d; ++j) transposed[(g * d + j) * kLanes + l] = row[j];
    }
  }
  for (int64_t k0 = 0; k0 < cb.num_codes; k0 += tile_codes)
    for (int64_t g = 0; g < groups; ++g)
      kernel(cb, transposed.data() + g * d * kLanes, k0, std::min(cb.num_codes, k0 + tile_codes), states[g]);
  for (int64_t r = 0; r < rows; ++r) {
    const RowState& s = states[r / kLanes];
    const int l = static_cast<int>(r % kLanes);
    winners[r] = {s.index[l], s.best[l], s.second[l] - s.best[l]};
  }
}

// GEMM path: states absorb codes [k0, k0 + width) given product = -2 x.e for them.
void scan_product(const Codebook& cb, const float* product, int64_t rows, int64_t k0, int64_t width,
                  RowState* states) {
  const VecI iota = lane_iota();
  for (int64_t r = 0; r < rows; ++r) {
    RowState s = states[r];
    const float* p = product + r * width;
    int64_t k = 0;
    for (; k + kLanes <= width; k += kLanes)
      s.update(*reinterpret_cast<const VecF*>(p + k) + *reinterpret_cast<const VecF*>(cb.sq_norm.data() + k0 + k),
               iota + static_cast<int32_t>(k0 + k));
    if (k < width) {  // tail: pad with +inf, which never wins
      VecF v = splat(kInf);
      for (int64_t l = 0; k + l < width; ++l) v[l] = p[k + l] + cb.sq_norm[k0 + k + l];
      s.update(v, iota + static_cast<int32_t>(k0 + k));
    }
    states[r] = s;
  }
}

// Finishes a row: the certain winner, or an exact float32 scan when the gap is within
// the expansion's rounding bound.
inline void finish_row(const Codebook& cb, const float* xrow, const Winner& w, int64_t* index_out,
                       float* dist_out) {
  const double x_norm = std::sqrt(static_cast<double>(exact_sq_dist(xrow, nullptr, cb.dim)));
  const double bound = (cb.dim + 4) * kUnitRoundoff * (cb.max_sq_norm + 2.0 * x_norm * cb.max_norm);
  if (static_cast<double>(w.gap) > 2.0 * bound) {
    *index_out = w.index;
    *dist_out = exact_sq_dist(xrow, cb.code(w.index), cb.dim);
    return;
  }
  float best = kInf;
  int64_t index = 0;
  for (int64_t k = 0; k < cb.num_codes; ++k) {
    const float dist = exact_sq_dist(xrow, cb.code(k), cb.dim);
    if (dist < best) best = dist, index = k;
  }
  *index_out = index;
  *dist_out = exact_sq_dist(xrow, cb.code(index), cb.dim);
}

// Nearest code of every row of x (N, D): writes indices and float32 squared distances.
void search(const at::Tensor& x, const at::Tensor& codebook, int64_t* indices, float* sq_dist) {
  const int64_t n = x.size(0), d = x.size(1);
  const bool fused = d >= 1 && d <= kFusedMaxDim;
  const Codebook cb(codebook);
  // Codes per tile: fused, a codebook tile of kTileBytes; GEMM, a product buffer of kTileBytes.
  const int64_t tile_codes = std::max<int64_t>(kLanes, kTileBytes / ((fused ? d + 1 : kRowBlock) * 4));
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  FASTVAE_DISPATCH_FLOATS(x.scalar_type(), "nearest_code", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      std::vector<float> scratch, transposed;
      std::vector<RowState> states(kRowBlock);
      std::vector<Winner> winners(kRowBlock);
      at::Tensor product;
      if (!fused) product = at::empty({kRowBlock * tile_codes}, at::kFloat);
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t begin = block * kRowBlock, end = std::min(n, begin + kRowBlock), rows = end - begin;
        const float* xf = rows_as_float(xp, begin, end, d, scratch);
        if (fused) {
          fused_search_block(cb, xf, rows, tile_codes, transposed, states, winners.data());
        } else {
          for (int64_t r = 0; r < rows; ++r) states[r].reset();
          const at::Tensor xblock = at::from_blob(const_cast<float*>(xf), {rows, d}, at::kFloat);
          for (int64_t k0 = 0; k0 < cb.num_codes; k0 += tile_codes) {
            const int64_t width = std::min(tile_codes, cb.num_codes - k0);
            at::Tensor out = product.narrow(0, 0, rows * width).view({rows, width});
            at::mm_out(out, xblock, cb.minus2.narrow(0, k0, width).t());
            scan_product(cb, out.data_ptr<float>(), rows, k0, width, states.data());
          }
          for (int64_t r = 0; r < rows; ++r) winners[r] = merge_lanes(states[r]);
        }
        for (int64_t r = 0; r < rows; ++r)
          finish_row(cb, xf + r * d, winners[r], indices + begin + r, sq_dist + begin + r);
      }
    });
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  check_cpu(x, "x");
  check_cpu(codebook, "codebook");
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2 && x.size(1) == codebook.size(1),
              "nearest_code: x must be (N, D) and codebook (K, D)");
  TORCH_CHECK(codebook.size(0) >= 1 && codebook.size(0) < std::numeric_limits<int32_t>::max() - kLanes,
              "nearest_code: the codebook needs 1 to 2^31 - 32 codes");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "nearest_code: x and codebook must share a dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook) {
  check_inputs(x, codebook);
  const at::Tensor xc = x.contiguous();
  at::Tensor indices = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  at::Tensor sq_dist = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  search(xc, codebook, indices.data_ptr<int64_t>(), sq_dist.data_ptr<float>());
  return {indices, sq_dist.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize(const at::Tensor& x, const at::Tensor& codebook,
                                                               double beta) {
  check_inputs(x, codebook);
  const at::Tensor xc = x.contiguous(), cbc = codebook.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  std::vector<float> sq_dist(n);
  search(xc, cbc, indices.data_ptr<int64_t>(), sq_dist.data());
  // Gather the winners (bit copies of codebook rows, never a one-hot product).
  at::Tensor quantized = at::empty({n, d}, x.options());
  const int64_t row_bytes = d * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(cbc.data_ptr());
  char* dst = static_cast<char*>(quantized.data_ptr());
  const int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(dst + i * row_bytes, src + idx[i] * row_bytes, row_bytes);
  });
  double total = 0;  // sequential sum: the same bits every run
  for (int64_t i = 0; i < n; ++i) total += sq_dist[i];
  const double loss = (1.0 + beta) * total / static_cast<double>(std::max<int64_t>(n * d, 1));
  return {quantized, indices, at::scalar_tensor(loss, x.options())};
}

std::tuple<at::Tensor, at::Tensor> vector_quantize_backward(const at::Tensor& grad_quantized,
                                                            const at::Tensor& grad_loss, const at::Tensor& x,
                                                            const at::Tensor& codebook, const at::Tensor& indices,
                                                            double beta) {
  check_inputs(x, codebook);
  const int64_t n = x.size(0), d = x.size(1), k = codebook.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), gq = grad_quantized.to(at::kFloat).contiguous();
  const at::Tensor cbf = codebook.to(at::kFloat).contiguous(), idx_t = indices.contiguous();
  const float scale =
      static_cast<float>(2.0 * grad_loss.to(at::kDouble).item<double>() / static_cast<double>(std::max<int64_t>(n * d, 1)));
  const float commit = static_cast<float>(beta) * scale;
  const float* xp = xf.data_ptr<float>();
  const float* gp = gq.data_ptr<float>();
  const float* ep = cbf.data_ptr<float>();
  const int64_t* idx = idx_t.data_ptr<int64_t>();

  at::Tensor grad_x = at::empty({n, d}, xf.options());
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* e = ep + idx[i] * d;
      for (int64_t j = 0; j < d; ++j) gx[i * d + j] = gp[i * d + j] + commit * (xp[i * d + j] - e[j]);
    }
  });

  // Codebook term: a segment sum over the rows of each code. A counting sort puts the
  // rows of code c at order[offset[c] .. offset[c + 1]) in increasing row order, and
  // each code sums its rows in that order: the same bits every run, no atomics.
  std::vector<int64_t> offset(k + 1, 0), order(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < k, "vector_quantize_backward: index out of range");
    ++offset[idx[i] + 1];
  }
  for (int64_t c = 0; c < k; ++c) offset[c + 1] += offset[c];
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[idx[i]]++] = i;
  }
  at::Tensor grad_codebook = at::zeros({k, d}, xf.options());
  float* gc = grad_codebook.data_ptr<float>();
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(d);
    for (int64_t c = begin; c < end; ++c) {
      if (offset[c] == offset[c + 1]) continue;
      std::fill(sum.begin(), sum.end(), 0.f);
      const float* e = ep + c * d;
      for (int64_t p = offset[c]; p < offset[c + 1]; ++p) {
        const float* xi = xp + order[p] * d;
        for (int64_t j = 0; j < d; ++j) sum[j] += xi[j] - e[j];
      }
      for (int64_t j = 0; j < d; ++j) gc[c * d + j] = -scale * sum[j];
    }
  });
  return {grad_x.to(x.scalar_type()), grad_codebook.to(codebook.scalar_type())};
}

}  // namespace fastvae
