// VQ column, C++ CPU backward kernels: vector_quantize's straight-through and
// rotation-trick estimators, residual_quantize's backward and its EMA statistics.
#include <cmath>

#include "../common.h"
#include "../ops.h"
#include "segment.h"

namespace fastvae {
namespace {

float grad_scale(const at::Tensor& grad_loss, int64_t elements) {  // d mse / d (x - e) per unit of grad_loss
  return static_cast<float>(2.0 * grad_loss.to(at::kDouble).item<double>() /
                            static_cast<double>(std::max<int64_t>(elements, 1)));
}

// What vector_quantize's backwards read: the operands, checked, in float32 (contiguous),
// and the scales of the codebook term (grad_scale) and of the commitment term (beta x it).
struct QuantizeBackward {
  const char* op;
  int64_t n, d, k;
  at::Tensor x32, grad32, codebook32, contiguous_indices;  // kept alive for the pointers below
  const float *xp, *gp, *ep;
  const int64_t* idx;
  float scale, commit;

  QuantizeBackward(const at::Tensor& grad_quantized, const at::Tensor& grad_loss, const at::Tensor& x,
                   const at::Tensor& codebook, const at::Tensor& indices, double beta, const char* op_name)
      : op(op_name) {
    check_cpu(x, "x");
    check_cpu(codebook, "codebook");
    TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2 && x.size(1) == codebook.size(1) && indices.numel() == x.size(0),
                op, ": x must be (N, D), codebook (K, D), indices (N,)");
    n = x.size(0), d = x.size(1), k = codebook.size(0);
    x32 = x.to(at::kFloat).contiguous(), grad32 = grad_quantized.to(at::kFloat).contiguous();
    codebook32 = codebook.to(at::kFloat).contiguous(), contiguous_indices = indices.contiguous();
    xp = x32.data_ptr<float>(), gp = grad32.data_ptr<float>(), ep = codebook32.data_ptr<float>();
    idx = contiguous_indices.data_ptr<int64_t>();
    scale = grad_scale(grad_loss, n * d), commit = static_cast<float>(beta) * scale;
  }
};

// grad_codebook[c] = -scale * sum over the rows i of code c of (x_i - e_c), in row order.
// It checks every index (Segments), so a backward computes it before reading codes at them.
at::Tensor codebook_term_grad(const QuantizeBackward& in) {
  const Segments segments(in.idx, in.n, in.k, in.op);
  const int64_t d = in.d;
  at::Tensor grad = at::empty({in.k, d}, in.x32.options());
  float* gc = grad.data_ptr<float>();
  segment_sums(
      segments, in.k, d,
      [&](int64_t i, float* acc) {
        const float *xi = in.xp + i * d, *e = in.ep + in.idx[i] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += xi[j] - e[j];
      },
      [&](int64_t c, const float* acc) {  // an unused code: 0, whatever the scale (inf, NaN)
        const float code_scale = segments.count(c) > 0 ? -in.scale : 0.f;
        for (int64_t j = 0; j < d; ++j) gc[c * d + j] = code_scale * acc[j];
      });
  return grad;
}

// grad_x (float32, (N, D)): row_grad(xi, gi, e, out) writes row i's gradient to out from
// its x, its grad_quantized and its code; rows in parallel, grain rows at least per task.
template <typename RowGrad>
at::Tensor grad_x_by_row(const QuantizeBackward& in, int64_t grain, const RowGrad& row_grad) {
  const int64_t d = in.d;
  at::Tensor grad_x = empty_output({in.n, d}, in.x32.options());
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, in.n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row_grad(in.xp + i * d, in.gp + i * d, in.ep + in.idx[i] * d, gx + i * d);
  });
  return grad_x;
}

}  // namespace

// Straight-through: grad_x = g + beta s (x - e), grad_codebook[c] = -s sum over the rows of
// code c of (x - e), s = 2 grad_loss / (N D).
std::tuple<at::Tensor, at::Tensor> vector_quantize_backward(const at::Tensor& grad_quantized,
                                                            const at::Tensor& grad_loss, const at::Tensor& x,
                                                            const at::Tensor& codebook, const at::Tensor& indices,
                                                            double beta) {
  const QuantizeBackward in(grad_quantized, grad_loss, x, codebook, indices, beta, "vector_quantize_backward");
  at::Tensor grad_codebook = codebook_term_grad(in);
  const int64_t d = in.d;
  const float commit = in.commit;
  at::Tensor grad_x = grad_x_by_row(in, 1024, [&](const float* xi, const float* gi, const float* e, float* out) {
    for (int64_t j = 0; j < d; ++j) out[j] = gi[j] + commit * (xi[j] - e[j]);
  });
  return {grad_x.to(x.scalar_type()), grad_codebook.to(codebook.scalar_type())};
}

// Rotation trick (Fifty et al. 2024): with u = x/|x|, q = e/|e|, w = (u + q)/|u + q| (all
// constants), the output is |e|/|x| (x - 2 (x.w) w + 2 (x.u) q), equal to e in value, so
// grad_x = |e|/|x| (g - 2 w (w.g) + 2 u (q.g)) + the commitment term. Per row: one pass for
// the five dot products, one to write. |x| = 0 passes g straight through; |e| = 0 gives
// q = 0; u = -q gives w = 0.
std::tuple<at::Tensor, at::Tensor> vector_quantize_rotation_backward(const at::Tensor& grad_quantized,
                                                                     const at::Tensor& grad_loss, const at::Tensor& x,
                                                                     const at::Tensor& codebook,
                                                                     const at::Tensor& indices, double beta) {
  const QuantizeBackward in(grad_quantized, grad_loss, x, codebook, indices, beta,
                            "vector_quantize_rotation_backward");
  at::Tensor grad_codebook = codebook_term_grad(in);
  const int64_t d = in.d;
  const float commit = in.commit;
  at::Tensor grad_x = grad_x_by_row(in, 256, [&](const float* xi, const float* gi, const float* e, float* out) {
    float xx = 0.f, ee = 0.f, xe = 0.f, xg = 0.f, eg = 0.f;
    for (int64_t j = 0; j < d; ++j) {
      xx += xi[j] * xi[j], ee += e[j] * e[j], xe += xi[j] * e[j];
      xg += xi[j] * gi[j], eg += e[j] * gi[j];
    }
    const float x_norm = std::sqrt(xx), e_norm = std::sqrt(ee);
    if (x_norm == 0.f) {
      for (int64_t j = 0; j < d; ++j) out[j] = gi[j] + commit * (xi[j] - e[j]);
      return;
    }
    const float inv_x = 1.f / x_norm, inv_e = e_norm > 0.f ? 1.f / e_norm : 0.f;
    const float uq = xe * inv_x * inv_e, ug = xg * inv_x, qg = eg * inv_e;
    const float sum_norm = std::sqrt(std::max(0.f, 2.f + 2.f * uq - (e_norm > 0.f ? 0.f : 1.f)));  // |u + q|
    const float inv_sum = sum_norm > 0.f ? 1.f / sum_norm : 0.f;
    const float wg = (ug + qg) * inv_sum, s = e_norm * inv_x;
    // g - 2 w (w.g) + 2 u (q.g), with w = (u + q) / |u + q|, u = x / |x|, q = e / |e|
    const float coef_u = (-2.f * wg * inv_sum + 2.f * qg) * inv_x, coef_q = -2.f * wg * inv_sum * inv_e;
    for (int64_t j = 0; j < d; ++j) out[j] = s * (gi[j] + coef_u * xi[j] + coef_q * e[j]) + commit * (xi[j] - e[j]);
  });
  return {grad_x.to(x.scalar_type()), grad_codebook.to(codebook.scalar_type())};
}

namespace {

// Each stage's segment sums of its residuals, never storing an (N, D) residual. The rows
// are cut into a fixed number of parts (set by N, never by the thread count); a part walks
// its rows in order, each row's residual in L1 through the stages, adding it to the part's
// own (R, K, D) sums; the parts are then added in part order: the same bits for any thread
// count, in two parallel regions (each a stall on a loaded machine, so few of them).
// after_code: stage r sums res_{r+1} = res_r - e_r (the backward's res_r - e_r), else res_r
// (the stage's input, the EMA's statistics). counts, if given, gets each code's row count
// per stage.
void residual_stage_sums(const float* xp, const float* ep, const int64_t* idx, int64_t n, int64_t stages, int64_t k,
                         int64_t d, bool after_code, float* sums, int64_t* counts, const char* op) {
  for (int64_t i = 0; i < n * stages; ++i) {  // checked before the threads start
    const int64_t c = idx[i];
    TORCH_CHECK(c >= 0 && c < k, op, ": index ", c, " out of range [0, ", k, ")");
  }
  if (counts != nullptr) {
    std::fill(counts, counts + stages * k, int64_t{0});
    for (int64_t i = 0; i < n * stages; ++i) ++counts[(i % stages) * k + idx[i]];
  }
  const int64_t size = stages * k * d, parts = std::clamp<int64_t>(n / 4096, 1, 4);
  const int64_t rows_per_part = (n + parts - 1) / parts;
  std::vector<float> partial((parts - 1) * size);  // part 0 adds into sums itself
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    std::vector<float> res(d);
    for (int64_t part = part_begin; part < part_end; ++part) {
      float* acc = part == 0 ? sums : partial.data() + (part - 1) * size;
      std::fill(acc, acc + size, 0.f);
      for (int64_t i = part * rows_per_part; i < std::min(n, (part + 1) * rows_per_part); ++i) {
        std::copy(xp + i * d, xp + (i + 1) * d, res.begin());
        for (int64_t r = 0; r < stages; ++r) {
          const int64_t row = (r * k + idx[i * stages + r]) * d;
          const float* e = ep + row;
          float* a = acc + row;
          if (after_code)
            for (int64_t j = 0; j < d; ++j) res[j] -= e[j], a[j] += res[j];
          else
            for (int64_t j = 0; j < d; ++j) a[j] += res[j], res[j] -= e[j];
        }
      }
    }
  });
  if (parts > 1)
    at::parallel_for(0, size, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t part = 1; part < parts; ++part) {
        const float* add = partial.data() + (part - 1) * size;
        for (int64_t i = begin; i < end; ++i) sums[i] += add[i];
      }
    });
}

void check_residual_inputs(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& indices,
                           const char* op) {
  check_cpu(x, "x");
  check_cpu(codebooks, "codebooks");
  TORCH_CHECK(x.dim() == 2 && codebooks.dim() == 3 && x.size(1) == codebooks.size(2) && indices.dim() == 2 &&
                  indices.size(0) == x.size(0) && indices.size(1) == codebooks.size(0),
              op, ": x must be (N, D), codebooks (R, K, D), indices (N, R)");
}

}  // namespace

// Backward of residual_quantize. Stage r's residual is res_r = x - sum_{j<r} e_j (earlier
// codes constant), its loss mse(e_r, sg(res_r)) + beta mse(res_r, sg(e_r)); quantized passes
// g straight to x. So grad_x = g + sum_r beta s_r (res_r - e_r) and grad codebook r gets
// -s_r sum over its rows of (res_r - e_r), s_r = 2 grad_losses[r] / (N D). Residuals are
// rebuilt from x and the indices (never stored whole: memory stays O(N R + R K D)).
// Without codebook_grad, grad_codebooks is not computed (its values are unspecified).
std::tuple<at::Tensor, at::Tensor> residual_quantize_backward(const at::Tensor& grad_quantized,
                                                              const at::Tensor& grad_losses, const at::Tensor& x,
                                                              const at::Tensor& codebooks, const at::Tensor& indices,
                                                              double beta, bool codebook_grad) {
  check_residual_inputs(x, codebooks, indices, "residual_quantize_backward");
  const int64_t n = x.size(0), d = x.size(1), stages = codebooks.size(0), k = codebooks.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), gq = grad_quantized.to(at::kFloat).contiguous();
  const at::Tensor cbf = codebooks.to(at::kFloat).contiguous(), idx_t = indices.contiguous();
  const at::Tensor gl = grad_losses.to(at::kDouble).contiguous();
  std::vector<float> scale(stages);
  for (int64_t r = 0; r < stages; ++r)
    scale[r] = static_cast<float>(2.0 * gl.data_ptr<double>()[r] / static_cast<double>(std::max<int64_t>(n * d, 1)));
  const float *xp = xf.data_ptr<float>(), *gp = gq.data_ptr<float>(), *ep = cbf.data_ptr<float>();
  const int64_t* idx = idx_t.data_ptr<int64_t>();
  at::Tensor grad_x = empty_output({n, d}, xf.options());
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> res(d);
    for (int64_t i = begin; i < end; ++i) {
      std::copy(xp + i * d, xp + (i + 1) * d, res.begin());
      float* out = gx + i * d;
      std::copy(gp + i * d, gp + (i + 1) * d, out);
      for (int64_t r = 0; r < stages; ++r) {
        const int64_t c = idx[i * stages + r];
        TORCH_CHECK(c >= 0 && c < k, "residual_quantize_backward: index out of range");
        const float* e = ep + (r * k + c) * d;
        const float commit = static_cast<float>(beta) * scale[r];
        for (int64_t j = 0; j < d; ++j) res[j] -= e[j], out[j] += commit * res[j];
      }
    }
  });
  // Without codebook_grad: not computed, no (R, K, D) pass (contiguous, as the op's fake says).
  at::Tensor grad_codebooks = at::empty({stages, k, d}, xf.options());
  if (codebook_grad) {  // residual_stage_sums zeroes it first
    float* gc = grad_codebooks.data_ptr<float>();
    residual_stage_sums(xp, ep, idx, n, stages, k, d, /*after_code=*/true, gc, nullptr, "residual_quantize_backward");
    for (int64_t r = 0; r < stages; ++r)
      for (int64_t i = 0; i < k * d; ++i) gc[r * k * d + i] *= -scale[r];
  }
  return {grad_x.to(x.scalar_type()), grad_codebooks.to(codebooks.scalar_type())};
}

// Per stage and code, the sum (float32, in row order) and count of the rows' stage inputs
// res_r = x - sum_{j<r} e_j: residual VQ's EMA statistics in one pass.
std::tuple<at::Tensor, at::Tensor> residual_segment_sums(const at::Tensor& x, const at::Tensor& codebooks,
                                                         const at::Tensor& indices) {
  check_residual_inputs(x, codebooks, indices, "residual_segment_sums");
  const int64_t n = x.size(0), d = x.size(1), stages = codebooks.size(0), k = codebooks.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous(), cbf = codebooks.to(at::kFloat).contiguous();
  const at::Tensor idx_t = indices.contiguous();
  at::Tensor sums = at::empty({stages, k, d}, xf.options());
  at::Tensor counts = at::empty({stages, k}, idx_t.options());
  residual_stage_sums(xf.data_ptr<float>(), cbf.data_ptr<float>(), idx_t.data_ptr<int64_t>(), n, stages, k, d,
                      /*after_code=*/false, sums.data_ptr<float>(), counts.data_ptr<int64_t>(),
                      "residual_segment_sums");
  return {sums, counts};
}

}  // namespace fastvae
