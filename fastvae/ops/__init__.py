"""The functional ops: argument checks, seeds, custom-op registration, backend dispatch."""
from .gaussian import gaussian_kl, reparameterize, reparameterize_kl
from .gumbel import categorical_kl, gumbel_softmax
from .gumbel_quantize import gumbel_quantize
from .kmeans import kmeans
from .residual_vq import residual_quantize
from .vq import nearest_code, vector_quantize

__all__ = ["reparameterize", "gaussian_kl", "reparameterize_kl", "gumbel_softmax", "categorical_kl", "gumbel_quantize",
           "nearest_code", "vector_quantize", "kmeans", "residual_quantize"]
