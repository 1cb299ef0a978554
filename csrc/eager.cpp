// The per-call path of plain eager calls on CPU, in C++: argument screening, the seed
// drawn from PyTorch's generator, and the ops' autograd Functions. At small sizes the
// Python path (checks, a randint per seed, a Python autograd.Function) cost several times
// the kernels.
//
// fastvae.ops calls these entry points first when the native backend is in force and no
// transform, compilation or dispatch mode is active (_common.native_eager). An entry point
// takes only what it can run exactly as the Python path would: plain tensors (or
// Parameters) on CPU in the kernels' dtypes, valid arguments, a CPU generator. For anything
// else it returns None and the Python path runs, so errors, other devices, priors and
// subclasses behave as before. The Functions' backwards mirror fastvae/ops/*.py; under
// create_graph=True they run the differentiable formula of fastvae.reference, as the
// Python backward ops do.
#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cfloat>
#include <cmath>
#include <mutex>
#include <optional>

#include "eager.h"
#include "ops.h"

namespace fastvae {
namespace {

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// No torch dispatch or function mode, no torch.func transform: what ops/_common.py's
// native_eager checks besides compilation, the backend and forward AD (Python state), read
// from the same thread-locals as torch._C's _len_torch_dispatch_stack,
// _len_torch_function_stack and _are_functorch_transforms_active, for nanoseconds.
bool no_mode_or_transform() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && at::impl::PythonTorchFunctionTLS::stack_len() == 0 &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// A tensor argument the kernels take: torch.Tensor or nn.Parameter (a subclass's
// __torch_function__ must see the call), strided, on CPU, in a kernel dtype.
std::optional<at::Tensor> kernel_tensor(py::handle obj) {
  if (!THPVariable_CheckExact(obj.ptr())) return std::nullopt;
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  const auto dtype = t.scalar_type();
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() ||
      (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16))
    return std::nullopt;
  return t;
}

// `obj` as a tensor like `ref` (same dtype; shape too when `same_shape`), else nullopt.
std::optional<at::Tensor> tensor_like(py::handle obj, const at::Tensor& ref, bool same_shape) {
  auto t = kernel_tensor(obj);
  if (!t || t->scalar_type() != ref.scalar_type() || (same_shape && !t->sizes().equals(ref.sizes())))
    return std::nullopt;
  return t;
}

// A Python float or int (not bool, nor a subclass) as a double.
std::optional<double> real_number(py::handle obj) {
  if (PyFloat_CheckExact(obj.ptr())) return PyFloat_AS_DOUBLE(obj.ptr());
  if (!PyLong_CheckExact(obj.ptr())) return std::nullopt;
  const double value = PyLong_AsDouble(obj.ptr());
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();  // an int too large for a double: the Python path says so
    return std::nullopt;
  }
  return value;
}

// The seed fastvae.ops.draw_seed draws, torch.randint(2**63 - 1, (1,), generator=g) on CPU,
// which takes one random64() of the generator (a range of 2^32 or more), so the random
// stream is the same whichever path draws it.
at::Tensor draw_seed(at::CPUGeneratorImpl* generator) {
  uint64_t bits;
  {
    std::lock_guard<std::mutex> lock(generator->mutex_);
    bits = generator->random64();
  }
  constexpr uint64_t kSeedBound = (uint64_t{1} << 63) - 1;
  at::Tensor seed = at::detail::empty_cpu({1}, at::kLong);  // not through the dispatcher: a CPU tensor
  seed.data_ptr<int64_t>()[0] = static_cast<int64_t>(bits % kSeedBound);
  return seed;
}

// A seed from `generator` (None: the default CPU generator); nullopt for a generator that
// is not a CPU torch.Generator (the Python path handles or rejects it).
std::optional<at::Tensor> seed_from(py::handle generator) {
  if (generator.is_none())
    return draw_seed(at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator()));
  if (!THPGenerator_Check(generator.ptr())) return std::nullopt;
  const at::Generator& gen = reinterpret_cast<THPGenerator*>(generator.ptr())->cdata;
  if (gen.device().type() != at::kCPU) return std::nullopt;
  return draw_seed(at::check_generator<at::CPUGeneratorImpl>(gen));
}

// A reduction of gaussian_kl's (per_sample: mu has a first dimension), else nullopt.
std::optional<std::string> reduction_name(py::handle obj, const at::Tensor& mu) {
  if (!PyUnicode_CheckExact(obj.ptr())) return std::nullopt;
  std::string name = obj.cast<std::string>();
  const bool per_sample = name == "per_sample" && mu.dim() > 0;
  if (name != "none" && name != "sum" && name != "mean" && name != "batchmean" && !per_sample) return std::nullopt;
  return name;
}

// A Python int (not bool) in [-ndim, ndim) as a dimension index in [0, ndim), else nullopt.
std::optional<int64_t> index_in(py::handle obj, int64_t ndim) {
  if (!PyLong_CheckExact(obj.ptr())) return std::nullopt;
  const long long dim = PyLong_AsLongLong(obj.ptr());
  if (dim == -1 && PyErr_Occurred()) {
    PyErr_Clear();  // past int64: the Python path says it is out of range
    return std::nullopt;
  }
  if (dim < -ndim || dim >= ndim) return std::nullopt;
  return (dim + ndim) % ndim;
}

// tau as ops/gumbel.py's _tau_tensor gives it to the kernels for float32/16-bit logits:
// a finite number > 0 (capped at float32's largest) in a new one-element float32 tensor,
// or a one-element floating-point CPU tensor reshaped and converted (keeping its autograd
// history). Anything else (NumPy scalars, other devices, bad values) is nullopt.
std::optional<at::Tensor> tau_tensor(py::handle obj) {
  if (THPVariable_CheckExact(obj.ptr())) {
    const at::Tensor& tau = THPVariable_Unpack(obj.ptr());
    if (!tau.is_floating_point() || tau.numel() != 1 || !tau.device().is_cpu() || tau.layout() != at::kStrided)
      return std::nullopt;
    return tau.reshape({1}).to(at::kFloat);
  }
  auto value = real_number(obj);
  if (!value || !std::isfinite(*value) || *value <= 0) return std::nullopt;
  at::Tensor tau = at::detail::empty_cpu({1}, at::kFloat);
  tau.data_ptr<float>()[0] = static_cast<float>(std::min(*value, static_cast<double>(FLT_MAX)));
  return tau;
}

// Whether a call on these inputs records autograd (ops/_common.py's needs_autograd, in a
// plain eager call): grad mode on and some input requiring grad. Otherwise the kernel runs
// bare, as on the Python path.
bool records(std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs)
    if (t.requires_grad()) return true;
  return false;
}

// The differentiable formula fastvae.reference gives for a backward op, called with
// grad mode on (create_graph=True) so autograd records it: second derivatives stay exact.
// Result: a tensor or a sequence of tensors, as the formula returns.
template <typename Result, typename... Args>
Result formula(const char* name, Args&&... args) {
  py::gil_scoped_acquire gil;
  static py::object* reference = new py::object(py::module_::import("fastvae.reference"));  // never freed: exit order
  return reference->attr(name)(std::forward<Args>(args)...).template cast<Result>();
}

struct Reparameterize : torch::autograd::Function<Reparameterize> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                            const at::Tensor& seed) {
    at::Tensor z = reparameterize(mu, logvar, seed);
    ctx->save_for_backward({mu, logvar, z, seed});
    return z;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_z = grads[0];
    if (!ctx->needs_input_grad(1)) return {grad_z, at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    // As in ops/gaussian.py: the kernel writes a non-contiguous grad_z's copy itself.
    const bool dense_grad_mu = ctx->needs_input_grad(0) && !grad_z.is_contiguous();
    const auto g = at::GradMode::is_enabled()
                       ? formula<variable_list>("reparameterize_backward", grad_z, saved[0], saved[1], saved[2],
                                                saved[3], dense_grad_mu)
                       : reparameterize_backward(grad_z, saved[0], saved[1], saved[2], saved[3], dense_grad_mu);
    return {dense_grad_mu ? g[0] : grad_z, g.back(), at::Tensor()};
  }
};

struct GaussianKL : torch::autograd::Function<GaussianKL> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                            const std::string& reduction) {
    ctx->save_for_backward({mu, logvar});
    ctx->saved_data["reduction"] = reduction;
    return gaussian_kl(mu, logvar, c10::nullopt, c10::nullopt, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const auto g = at::GradMode::is_enabled()
                       ? formula<variable_list>("gaussian_kl_backward", grads[0], saved[0], saved[1], py::none(),
                                                py::none(), reduction)
                       : gaussian_kl_backward(grads[0], saved[0], saved[1], c10::nullopt, c10::nullopt, reduction);
    return {g[0], g[1], at::Tensor()};
  }
};

struct ReparameterizeKL : torch::autograd::Function<ReparameterizeKL> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const at::Tensor& seed, const std::string& reduction) {
    auto [z, kl] = reparameterize_kl(mu, logvar, seed, reduction);
    ctx->save_for_backward({mu, logvar, z, seed});
    ctx->saved_data["reduction"] = reduction;
    return {z, kl};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const auto g = at::GradMode::is_enabled()
                       ? formula<variable_list>("reparameterize_kl_backward", grads[0], grads[1], s[0], s[1], s[2],
                                                s[3], reduction)
                       : reparameterize_kl_backward(grads[0], grads[1], s[0], s[1], s[2], s[3], reduction);
    return {g[0], g[1], at::Tensor(), at::Tensor()};
  }
};

// d loss / d tau from the logits' gradient and the soft sample y, as ops/gumbel.py's
// _tau_gradient (the same ops, so under create_graph=True autograd records the same graph).
at::Tensor tau_gradient(const at::Tensor& grad_logits, const at::Tensor& y, const at::Tensor& tau) {
  const auto ct = tau.scalar_type();
  const at::Tensor log_y = at::where(y > 0, at::log(y.to(ct)), at::zeros({}, tau.options()));
  return -(grad_logits.to(ct) * log_y).sum().reshape(tau.sizes());
}

struct GumbelSoftmax : torch::autograd::Function<GumbelSoftmax> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& seed,
                            const at::Tensor& tau, bool hard, int64_t dim) {
    at::Tensor y = gumbel_softmax(logits, seed, tau, hard, dim);
    // As in ops/gumbel.py: a one-hot output cannot give the soft sample back, so hard
    // keeps what regenerates it; soft backs off the output itself.
    ctx->save_for_backward(hard ? variable_list{logits, seed, tau} : variable_list{y, tau});
    ctx->saved_data["hard"] = hard;
    ctx->saved_data["dim"] = dim;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool hard = ctx->saved_data["hard"].toBool();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor& tau = s.back();
    const bool graph = at::GradMode::is_enabled();
    at::Tensor grad;
    if (hard) {
      grad = graph ? formula<at::Tensor>("gumbel_softmax_backward", grads[0], s[0], s[1], tau, dim)
                   : gumbel_softmax_backward(grads[0], s[0], s[1], tau, dim);
    } else {
      grad = graph ? formula<at::Tensor>("gumbel_softmax_backward_from_sample", grads[0], s[0], tau, dim)
                   : gumbel_softmax_backward_from_sample(grads[0], s[0], tau, dim);
    }
    at::Tensor grad_tau;
    if (ctx->needs_input_grad(2))
      grad_tau = tau_gradient(grad, hard ? gumbel_softmax(s[0], s[1], tau, false, dim) : s[0], tau);
    return {grad, at::Tensor(), grad_tau, at::Tensor(), at::Tensor()};
  }
};

struct VectorQuantize : torch::autograd::Function<VectorQuantize> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& codebook, double beta,
                               bool rotation) {
    auto [quantized, indices, loss] = vector_quantize(x, codebook, beta);
    ctx->save_for_backward({x, codebook, indices});
    ctx->mark_non_differentiable({indices});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["rotation"] = rotation;
    return {quantized, indices, loss};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const double beta = ctx->saved_data["beta"].toDouble();
    const bool rotation = ctx->saved_data["rotation"].toBool();
    variable_list g;
    if (at::GradMode::is_enabled()) {
      g = formula<variable_list>(rotation ? "vector_quantize_rotation_backward" : "vector_quantize_backward",
                                 grads[0], grads[2], s[0], s[1], s[2], beta);
    } else {
      auto [grad_x, grad_codebook] = (rotation ? vector_quantize_rotation_backward : vector_quantize_backward)(
          grads[0], grads[2], s[0], s[1], s[2], beta);
      g = {grad_x, grad_codebook};
    }
    return {g[0], g[1], at::Tensor(), at::Tensor()};
  }
};

}  // namespace

py::object eager_reparameterize(py::handle mu_obj, py::handle logvar_obj, py::handle generator) {
  if (!no_mode_or_transform()) return py::none();
  auto mu = kernel_tensor(mu_obj);
  if (!mu) return py::none();
  auto logvar = tensor_like(logvar_obj, *mu, true);
  if (!logvar) return py::none();
  auto seed = seed_from(generator);
  if (!seed) return py::none();
  if (!records({*mu, *logvar})) return py::cast(reparameterize(*mu, *logvar, *seed));
  return py::cast(Reparameterize::apply(*mu, *logvar, *seed));
}

py::object eager_gaussian_kl(py::handle mu_obj, py::handle logvar_obj, py::handle prior_mu, py::handle prior_logvar,
                             py::handle reduction_obj) {
  if (!no_mode_or_transform()) return py::none();
  auto mu = kernel_tensor(mu_obj);
  if (!mu || !prior_mu.is_none() || !prior_logvar.is_none()) return py::none();
  auto logvar = tensor_like(logvar_obj, *mu, true);
  auto reduction = reduction_name(reduction_obj, *mu);
  if (!logvar || !reduction) return py::none();
  if (!records({*mu, *logvar})) return py::cast(gaussian_kl(*mu, *logvar, c10::nullopt, c10::nullopt, *reduction));
  return py::cast(GaussianKL::apply(*mu, *logvar, *reduction));
}

py::object eager_reparameterize_kl(py::handle mu_obj, py::handle logvar_obj, py::handle reduction_obj,
                                   py::handle generator) {
  if (!no_mode_or_transform()) return py::none();
  auto mu = kernel_tensor(mu_obj);
  if (!mu) return py::none();
  auto logvar = tensor_like(logvar_obj, *mu, true);
  auto reduction = reduction_name(reduction_obj, *mu);
  if (!logvar || !reduction) return py::none();
  auto seed = seed_from(generator);
  if (!seed) return py::none();
  if (!records({*mu, *logvar})) {
    auto [z, kl] = reparameterize_kl(*mu, *logvar, *seed, *reduction);
    return py::make_tuple(z, kl);
  }
  auto outputs = ReparameterizeKL::apply(*mu, *logvar, *seed, *reduction);
  return py::make_tuple(outputs[0], outputs[1]);
}

py::object eager_gumbel_softmax(py::handle logits_obj, py::handle tau_obj, py::handle hard, py::handle dim_obj,
                                py::handle generator) {
  if (!no_mode_or_transform()) return py::none();
  auto logits = kernel_tensor(logits_obj);
  if (!logits || logits->dim() == 0) return py::none();
  if (hard.ptr() != Py_True && hard.ptr() != Py_False) return py::none();
  auto dim = index_in(dim_obj, logits->dim());
  if (!dim || logits->size(*dim) == 0) return py::none();
  auto tau = tau_tensor(tau_obj);
  if (!tau) return py::none();
  auto seed = seed_from(generator);
  if (!seed) return py::none();
  if (!records({*logits, *tau})) return py::cast(gumbel_softmax(*logits, *seed, *tau, hard.ptr() == Py_True, *dim));
  return py::cast(GumbelSoftmax::apply(*logits, *seed, *tau, hard.ptr() == Py_True, *dim));
}

py::object eager_vector_quantize(py::handle x_obj, py::handle codebook_obj, py::handle beta_obj,
                                 py::handle estimator) {
  if (!no_mode_or_transform()) return py::none();
  auto x = kernel_tensor(x_obj);
  if (!x || x->dim() == 0) return py::none();
  auto codebook = tensor_like(codebook_obj, *x, false);
  auto beta = real_number(beta_obj);
  if (!codebook || !beta || !std::isfinite(*beta) || *beta < 0 || codebook->dim() != 2 || codebook->size(0) == 0 ||
      codebook->size(1) == 0 || x->size(-1) != codebook->size(1))
    return py::none();
  if (!PyUnicode_CheckExact(estimator.ptr())) return py::none();
  const std::string name = estimator.cast<std::string>();
  if (name != "ste" && name != "rotation") return py::none();
  // As ops/vq.py: (..., D) runs as (N, D), and the outputs take x's leading shape back. A
  // 2-D x runs as it is (the reshapes would add two view nodes to the graph, same values).
  const bool flat = x->dim() == 2;
  const at::Tensor rows = flat ? *x : x->reshape({-1, x->size(-1)});
  at::Tensor quantized, indices, loss;
  if (!records({*x, *codebook})) {
    std::tie(quantized, indices, loss) = vector_quantize(rows, *codebook, *beta);
  } else {
    auto outputs = VectorQuantize::apply(rows, *codebook, *beta, name == "rotation");
    quantized = outputs[0], indices = outputs[1], loss = outputs[2];
  }
  if (flat) return py::make_tuple(quantized, indices, loss);
  return py::make_tuple(quantized.reshape(x->sizes()), indices.reshape(x->sizes().slice(0, x->dim() - 1)), loss);
}

}  // namespace fastvae
