"""``torch.nn`` layers over the functional ops: drop-in modules for VAE-family models.

One module per op column (``gaussian``, ``gumbel``, ``vq``); every layer is importable as
``fastvae.nn.<Name>``.
"""
from .gaussian import DiagonalGaussian, GaussianKL, Reparameterize
from .gumbel import GumbelQuantizer, GumbelSoftmax
from .residual_vq import ResidualVectorQuantizer
from .vq import VectorQuantizer

__all__ = ["Reparameterize", "GaussianKL", "DiagonalGaussian", "GumbelSoftmax", "GumbelQuantizer", "VectorQuantizer",
           "ResidualVectorQuantizer"]
