"""What the VQ layers share: input and option checks, codebook initialisations."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import check_dim, check_float, check_size
from ..ops.vq import ESTIMATORS

CODEBOOK_INITS = ("uniform", "normal", "kaiming")


def check_input(x, channel_dim, dim):
    """A VQ layer's input: a float tensor with ``dim`` features along ``channel_dim``; returns
    ``channel_dim`` as a non-negative index."""
    check_float("x", x)
    channel_dim_index = check_dim("channel_dim", channel_dim, x.dim())
    if x.shape[channel_dim_index] != dim:
        raise ValueError(f"x has {x.shape[channel_dim_index]} features along channel_dim={channel_dim} but the "
                         f"quantizer's dim is {dim}")
    return channel_dim_index


def check_tokenizer_options(*, kmeans_iters, codebook_dim, estimator, ema_debias, ema_decay, codebook_init):
    check_size("kmeans_iters", kmeans_iters)
    if codebook_dim is not None:
        check_size("codebook_dim", codebook_dim)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {estimator!r}")
    if ema_debias and ema_decay is None:
        raise ValueError("ema_debias=True needs an EMA codebook: pass ema_decay too")
    if codebook_init not in CODEBOOK_INITS:
        raise ValueError(f"codebook_init must be one of {', '.join(map(repr, CODEBOOK_INITS))}, got {codebook_init!r}")


@torch.no_grad()
def init_codebook_(codebook, kind, cosine):
    """Fill ``codebook`` (K, D) in place by ``kind``; returns the EMA count each code starts
    with (one pseudo-assignment, or none for ``"normal"``)."""
    num_codes, dim = codebook.shape
    if kind == "uniform":  # the original VQ-VAE, taming, diffusers
        nn.init.uniform_(codebook, -1.0 / num_codes, 1.0 / num_codes)
    elif kind == "normal":
        nn.init.normal_(codebook)
    else:  # vector-quantize-pytorch: kaiming_uniform_ of its (1, K, D) tensor, fan_in = K * D
        bound = math.sqrt(6.0 / (num_codes * dim))
        nn.init.uniform_(codebook, -bound, bound)
    if cosine:
        codebook.copy_(F.normalize(codebook, dim=-1))
    return 0.0 if kind == "normal" else 1.0
