// Gumbel column, C++ CPU kernels: gumbel_quantize (the Gumbel-Softmax sample over K codes
// mixed with the (K, D) codebook) and its backward, without ever writing the (N, K) sample;
// gumbel_quantize_kl also gives each row's KL(softmax(logits) || uniform) (GumbelQuantizer's
// loss) from the same pass over the row, and its backward adds the KL's gradient there.
//
// Rows go in blocks of a few thousand (kBlockBytes of float32 scratch per row block):
// * forward: each row of the block (in parallel) gets z = logits + noise (the Gumbel
//   stream of gumbel.cpp, 4 kLanes columns per Philox step), its max m, argmax and
//   log_sum = log sum exp((z - m) / tau), and its weights exp((z - m) / tau) in the block's
//   scratch; then one GEMM quantized[block] = weights_block @ codebook (MKL, both cores),
//   whose rows are scaled by exp(-log_sum) (normalising the (D,) output rather than the
//   (K,) weights). Hard: no scratch, no GEMM: the code at the argmax is copied. Saved per
//   row: (m, log_sum), and for the KL lse = logsumexp(logits).
// * backward: d_y = grad_quantized @ codebook^T (one full-size GEMM written into
//   grad_logits itself for float32 logits, else a GEMM per block into scratch); each row
//   rebuilds y from the noise and (m, log_sum), takes s = sum(y d_y), and turns d_y in
//   place into y (d_y - s) / tau; its
//   share of tau's gradient, -sum(grad * log y), comes from the same pass; the KL's
//   gradient p (log p - sum(p log p)) grad_kl, p = softmax(logits), is added in the last
//   write (computed while the logits are loaded, before the noise). Soft:
//   grad_codebook += y_block^T @ grad_quantized[block] (a GEMM on the block's scratch);
//   hard: the gradient rows are summed into their codes (index_add).
// A row holding a NaN or +inf logit gives NaN (output, statistics, gradient); an all -inf
// row gives zeros, as reference.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "gumbel_quantize_rows.h"
#include "rows.h"

namespace fastvae {
namespace {

using namespace gumbel_rows;  // the per-row work (gumbel_quantize_rows.h)

// float32 scratch a row block may take (2048 rows at K = 8192, a quarter of DALL-E scale's
// (N, K) sample): MKL's threads split a GEMM of a few hundred rows badly (measured, two
// threads: 256-row blocks took 2x the time of one full-size GEMM, 2048-row blocks 1.3x).
constexpr int64_t kBlockBytes = 64 << 20;

int64_t rows_per_block(const Problem& p) { return std::max<int64_t>(1, kBlockBytes / (4 * p.padded)); }

// (rows, cols) float32 view of scratch whose rows are `stride` floats apart.
at::Tensor matrix(float* data, int64_t rows, int64_t cols, int64_t stride) {
  return at::from_blob(data, {rows, cols}, {stride, 1}, at::TensorOptions().dtype(at::kFloat));
}

Problem make_problem(const at::Tensor& logits, const at::Tensor& seed, const at::Tensor& tau) {
  const int64_t K = logits.size(1);
  const float inv_tau = static_cast<float>(
      std::clamp(1.0 / read_tau(tau), static_cast<double>(FLT_MIN), static_cast<double>(FLT_MAX)));
  return {read_seed(seed), inv_tau, K, (K + kChunk - 1) / kChunk * kChunk};
}

void check_inputs(const at::Tensor& logits, const at::Tensor& codebook) {
  check_cpu(logits, "logits");
  check_cpu(codebook, "codebook");
  TORCH_CHECK(logits.dim() == 2 && codebook.dim() == 2 && codebook.size(0) == logits.size(1),
              "gumbel_quantize: logits must be (N, K) and codebook (K, D)");
}

// The forward of gumbel_quantize and, with `kl` (N,) defined, of gumbel_quantize_kl: stats
// rows of (m, log_sum), or (m, log_sum, lse) with the KL.
void quantize_forward(const Problem& p, const at::Tensor& logits, const at::Tensor& cb, bool hard,
                      at::Tensor& quantized, at::Tensor& indices, at::Tensor& stats, at::Tensor& kl) {
  const int64_t N = logits.size(0), D = cb.size(1), width = stats.size(1);
  float* q = quantized.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  float* st = stats.data_ptr<float>();
  float* kl_out = kl.defined() ? kl.data_ptr<float>() : nullptr;
  const float* codes = cb.data_ptr<float>();
  // One row's sample weights into buf; its index, statistics and KL out.
  auto sample = [&](const auto* x, int64_t row, float* buf) {
    UniformKL row_kl;
    idx[row] = sample_row(p, x + row * p.K, row, buf, st + width * row, kl_out ? &row_kl : nullptr);
    if (kl_out != nullptr) {
      kl_out[row] = row_kl.kl;
      st[width * row + 2] = row_kl.lse;
    }
  };
  FASTVAE_DISPATCH_FLOATS(logits.scalar_type(), "gumbel_quantize", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    if (hard) {
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / p.K), [&](int64_t begin, int64_t end) {
        std::vector<float> buf(p.padded);
        for (int64_t row = begin; row < end; ++row) {
          sample(x, row, buf.data());
          const float top = st[width * row];
          float* out = q + row * D;
          if (std::isnan(top) || top == -kInf) std::fill(out, out + D, top == -kInf ? 0.0f : kNaN);
          else std::copy(codes + idx[row] * D, codes + (idx[row] + 1) * D, out);
        }
      });
      return;
    }
    const int64_t block = std::min(rows_per_block(p), N);
    // The soft weights of one row block (uninitialised, warm from the output cache: no page faults per call)
    const at::Tensor scratch = empty_output({block * p.padded}, cb.options());
    float* weights = scratch.data_ptr<float>();
    for (int64_t first = 0; first < N; first += block) {
      const int64_t rows = std::min(block, N - first);
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / p.K), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) sample(x, first + r, weights + r * p.padded);
      });
      auto out = quantized.narrow(0, first, rows);
      at::mm_out(out, matrix(weights, rows, p.K, p.padded), cb);
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {  // divide by the weights' sum (NaN and empty rows are set)
          const float top = st[width * (first + r)], log_sum = st[width * (first + r) + 1];
          if (std::isnan(top) || top == -kInf) continue;
          const float inv_sum = std::exp(-log_sum);
          for (float* v = q + (first + r) * D; v < q + (first + r + 1) * D; ++v) *v *= inv_sum;
        }
      });
    }
  });
}

// The backward of gumbel_quantize and, with grad_kl and kl (N,) defined, of gumbel_quantize_kl
// (stats then hold lse in column 2).
std::vector<at::Tensor> quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& logits_in,
                                          const at::Tensor& codebook, const at::Tensor& seed, const at::Tensor& tau,
                                          const at::Tensor& stats_in, const c10::optional<at::Tensor>& indices,
                                          const at::Tensor& grad_kl_in, const at::Tensor& kl_in) {
  check_inputs(logits_in, codebook);
  check_cpu(grad_quantized, "grad_quantized");
  const Problem p = make_problem(logits_in, seed, tau);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const at::Tensor grad = grad_quantized.to(at::kFloat).contiguous();
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  const int64_t N = logits.size(0), D = cb.size(1), K = p.K, width = stats.size(1);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({N, D}), "gumbel_quantize_backward: grad_quantized must be (N, D)");
  const bool with_kl = kl_in.defined();
  const at::Tensor grad_kl = with_kl ? grad_kl_in.to(at::kFloat).expand({N}).contiguous() : at::Tensor();
  const at::Tensor kl = with_kl ? kl_in.to(at::kFloat).contiguous() : at::Tensor();
  const bool hard = indices.has_value();
  const bool float_logits = logits.scalar_type() == at::kFloat;
  auto grad_logits = empty_output({N, K}, logits.options());
  auto grad_codebook = at::zeros({K, D}, cb.options());
  std::vector<double> tau_terms(N, 0.0);  // per row, summed in order: no dependence on the split
  const float* st = stats.data_ptr<float>();
  const int64_t block = std::min(rows_per_block(p), std::max<int64_t>(N, 1));
  // d_y rows: the grad_logits rows themselves for float32 logits, else a float32 block;
  // the soft sample of the block (both uninitialised, warm from the output cache)
  const at::Tensor sample_block = hard ? at::Tensor() : empty_output({block * p.padded}, cb.options());
  const at::Tensor dy_block_scratch = float_logits ? at::Tensor() : empty_output({block * K}, cb.options());
  float* samples = hard ? nullptr : sample_block.data_ptr<float>();
  // float32 logits: d_y of every row by one full-size GEMM into the gradient itself
  if (float_logits) at::mm_out(grad_logits, grad, cb.t());
  FASTVAE_DISPATCH_FLOATS(logits.scalar_type(), "gumbel_quantize_backward", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    for (int64_t first = 0; first < N; first += block) {
      const int64_t rows = std::min(block, N - first);
      float* dy = float_logits ? reinterpret_cast<float*>(out) + first * K : dy_block_scratch.data_ptr<float>();
      if (!float_logits) {
        auto dy_block = matrix(dy, rows, K, K);
        at::mm_out(dy_block, grad.narrow(0, first, rows), cb.t());
      }
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / K), [&](int64_t begin, int64_t end) {
        std::vector<float> own(hard ? p.padded : 0), kl_grad(with_kl ? p.padded : 0);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t row = first + r;
          float* y = hard ? own.data() : samples + r * p.padded;
          float* g = dy + r * K;
          const float top = st[width * row], log_sum = st[width * row + 1];
          load_row(x + row * K, 1, K, p.padded, -kInf, y);
          if (with_kl) {  // y holds z
            const UniformKL row_kl{kl.data_ptr<float>()[row], st[width * row + 2]};
            add_noise_with_kl_gradient(p, row, y, row_kl, grad_kl.data_ptr<float>()[row], kl_grad.data());
          } else {
            add_noise(p, row, y, kNoVisit);
          }
          if (std::isnan(top) || top == -kInf) {
            const float fill = top == -kInf ? 0.0f : kNaN;
            std::fill(y, y + p.padded, fill);
            std::fill(g, g + K, fill);
            tau_terms[row] = fill;
          } else {
            tau_terms[row] = softmax_backward_row(p, top, log_sum, y, g, with_kl ? kl_grad.data() : nullptr);
          }
          if (!float_logits)
            for (int64_t c = 0; c < K; ++c) out[row * K + c] = static_cast<scalar_t>(g[c]);
        }
      });
      if (!hard) grad_codebook.addmm_(matrix(samples, rows, K, p.padded).t(), grad.narrow(0, first, rows));
    }
  });
  if (hard) {
    // One-hot rows: each row's gradient goes to its code; an all -inf row has none, a NaN
    // row (a NaN weight on every code) makes every code's gradient NaN.
    const auto top = stats.select(1, 0);
    const auto rows = (top > -kInf).nonzero().squeeze(1);
    grad_codebook.index_add_(0, indices->index_select(0, rows), grad.index_select(0, rows));
    if (top.isnan().any().item<bool>()) grad_codebook.fill_(kNaN);
  }
  double grad_tau = 0.0;
  for (double term : tau_terms) grad_tau += term;
  return {grad_logits, grad_codebook.to(codebook.scalar_type()),
          at::full(tau.sizes(), grad_tau, tau.options())};
}

// gumbel_quantize's and gumbel_quantize_kl's outputs: quantized, indices, stats of `width` columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& logits_in,
                                                                    const at::Tensor& codebook, const at::Tensor& seed,
                                                                    const at::Tensor& tau, bool hard, bool with_kl) {
  check_inputs(logits_in, codebook);
  const Problem p = make_problem(logits_in, seed, tau);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const int64_t N = logits.size(0);
  auto quantized = at::empty({N, cb.size(1)}, cb.options());
  auto indices = at::empty({N}, logits.options().dtype(at::kLong));
  auto stats = at::empty({N, with_kl ? 3 : 2}, cb.options());
  auto kl = with_kl ? at::empty({N}, cb.options()) : at::Tensor();
  quantize_forward(p, logits, cb, hard, quantized, indices, stats, kl);
  return {quantized.to(logits.scalar_type()), indices, stats, kl};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_quantize(const at::Tensor& logits, const at::Tensor& codebook,
                                                               const at::Tensor& seed, const at::Tensor& tau,
                                                               bool hard) {
  auto [quantized, indices, stats, kl] = quantize(logits, codebook, seed, tau, hard, false);
  return {quantized, indices, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gumbel_quantize_kl(const at::Tensor& logits,
                                                                              const at::Tensor& codebook,
                                                                              const at::Tensor& seed,
                                                                              const at::Tensor& tau, bool hard) {
  return quantize(logits, codebook, seed, tau, hard, true);
}

std::vector<at::Tensor> gumbel_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& logits,
                                                 const at::Tensor& codebook, const at::Tensor& seed,
                                                 const at::Tensor& tau, const at::Tensor& stats,
                                                 const c10::optional<at::Tensor>& indices) {
  return quantize_backward(grad_quantized, logits, codebook, seed, tau, stats, indices, at::Tensor(), at::Tensor());
}

std::vector<at::Tensor> gumbel_quantize_kl_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_kl,
                                                    const at::Tensor& logits, const at::Tensor& codebook,
                                                    const at::Tensor& seed, const at::Tensor& tau,
                                                    const at::Tensor& stats, const at::Tensor& kl,
                                                    const c10::optional<at::Tensor>& indices) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == 3 && kl.sizes() == at::IntArrayRef({logits.size(0)}),
              "gumbel_quantize_kl_backward: stats must be (N, 3) and kl (N,), as gumbel_quantize_kl returns them");
  return quantize_backward(grad_quantized, logits, codebook, seed, tau, stats, indices, grad_kl, kl);
}

}  // namespace fastvae
