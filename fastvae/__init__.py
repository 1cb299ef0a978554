"""fastvae: fused kernels for the stochastic layers of VAE-family models."""
from . import nn  # fastvae.nn is usable after `import fastvae`, as torch.nn is
from ._backend import BackendError, available_backends, get_backend, set_backend, use_backend
from .ops import (categorical_kl, gaussian_kl, gumbel_quantize, gumbel_softmax, kmeans, nearest_code, reparameterize,
                  reparameterize_kl, residual_quantize, vector_quantize)

__version__ = "0.1.0"
__all__ = ["reparameterize", "gaussian_kl", "reparameterize_kl", "gumbel_softmax", "categorical_kl", "gumbel_quantize",
           "nearest_code", "vector_quantize", "kmeans", "residual_quantize", "available_backends", "use_backend",
           "set_backend", "get_backend",
           "BackendError"]
