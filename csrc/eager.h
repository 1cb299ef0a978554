// The C++ per-call path of plain eager CPU calls (csrc/eager.cpp): each entry point
// returns the op's result, or None when the call is one for the Python path.
#pragma once
#include <torch/extension.h>

namespace fastvae {

pybind11::object eager_reparameterize(pybind11::handle mu, pybind11::handle logvar, pybind11::handle generator);
pybind11::object eager_gaussian_kl(pybind11::handle mu, pybind11::handle logvar, pybind11::handle prior_mu,
                                   pybind11::handle prior_logvar, pybind11::handle reduction);
pybind11::object eager_reparameterize_kl(pybind11::handle mu, pybind11::handle logvar, pybind11::handle reduction,
                                         pybind11::handle generator);
pybind11::object eager_gumbel_softmax(pybind11::handle logits, pybind11::handle tau, pybind11::handle hard,
                                      pybind11::handle dim, pybind11::handle generator);
pybind11::object eager_vector_quantize(pybind11::handle x, pybind11::handle codebook, pybind11::handle beta,
                                       pybind11::handle estimator);

}  // namespace fastvae
