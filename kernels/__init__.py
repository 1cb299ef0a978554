"""Triton kernels of fastvae (installed as ``fastvae.kernels``): the ``triton`` backend.

This module provides functions named as in ``fastvae.reference`` (the backend interface).
Importing it needs the ``triton`` package; for CPU tensors set ``TRITON_INTERPRET=1``
before the first import (Triton reads it when kernels are defined).
"""
import triton  # noqa: F401  (a missing triton makes this backend unavailable)

# ---- Gaussian column (kernels/gaussian.py)
from .gaussian import (gaussian_kl, gaussian_kl_backward, reparameterize, reparameterize_backward,  # noqa: F401
                       reparameterize_kl, reparameterize_kl_backward)
# ---- Gumbel column (kernels/gumbel.py)
from .gumbel import (  # noqa: E402,F401
    categorical_kl, categorical_kl_backward, gumbel_softmax, gumbel_softmax_backward,
    gumbel_softmax_backward_from_sample)
from .gumbel_quantize import (gumbel_quantize, gumbel_quantize_backward, gumbel_quantize_kl,  # noqa: E402,F401
                              gumbel_quantize_kl_backward)
# ---- VQ column (kernels/vq.py, kernels/vq_backward.py, kernels/residual_vq.py)
from .residual_vq import residual_quantize, residual_quantize_backward, residual_segment_sums  # noqa: E402,F401
from .vq import nearest_code, vector_quantize  # noqa: E402,F401
from .vq_backward import segment_mean, vector_quantize_backward, vector_quantize_rotation_backward  # noqa: E402,F401
