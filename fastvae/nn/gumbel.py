"""Gumbel column layers: the Gumbel-Softmax sample and the Gumbel quantizer (taming
``GumbelQuantize``, DALL-E dVAE)."""
import torch
from torch import nn

from .. import ops
from ..ops._common import check_dim, check_float, check_size
from ..ops.gumbel_quantize import gumbel_quantize_with_kl


class GumbelSoftmax(nn.Module):
    """Gumbel-Softmax sample over ``dim`` (straight-through one-hot when ``hard``).

    ``tau`` is a plain attribute so that annealing schedules can set it between steps.
    """

    def __init__(self, tau=1.0, hard=False, dim=-1):
        super().__init__()
        self.tau, self.hard, self.dim = tau, hard, dim

    def forward(self, logits):
        return ops.gumbel_softmax(logits, self.tau, self.hard, dim=self.dim)

    def extra_repr(self):
        return f"tau={self.tau}, hard={self.hard}, dim={self.dim}"


class GumbelQuantizer(nn.Module):
    """Discrete bottleneck by Gumbel-Softmax over ``num_codes`` codes of size ``dim``.

    ``forward(x)``, ``x`` with ``in_channels`` features along ``channel_dim`` (``(B, C, H, W)``
    by default), returns ``(quantized, indices, loss)``:

    * ``logits = proj(x)``, a linear projection of the features to ``num_codes`` logits at
      every position (taming's 1x1 convolution);
    * training: ``y = gumbel_softmax(logits, tau, hard=straight_through)`` over the codes,
      ``quantized = sum_k y_k * embed.weight[k]`` (``dim`` features along ``channel_dim``),
      ``indices = argmax_k y_k``, by the fused :func:`fastvae.gumbel_quantize` (the
      ``(N, K)`` sample is never written);
    * ``eval()``: ``indices = argmax_k logits`` (no noise, as DALL-E's tokenizer) and
      ``quantized`` is those codes;
    * ``loss = kl_weight * KL(softmax(logits) || uniform)``, the KL summed over codes and
      averaged over positions (taming's ``diff``; :func:`fastvae.categorical_kl` with
      ``reduction="mean"``). In training the fused op takes each position's KL in its pass
      over the logits (forward and backward), in eval ``categorical_kl``.

    ``tau`` is a plain attribute (set it between steps to anneal), or with
    ``learn_tau=True`` a parameter trained by gradient. Submodules are named as taming's
    (``proj``, ``embed``). ``taming_outputs=True`` returns taming's
    ``(quantized, loss, (None, None, indices))`` instead, for code written against it.
    Deliberate differences from taming: eval takes the argmax without noise (taming
    samples a hard code with noise), the KL has no ``+ 1e-10`` inside its log, and
    ``proj`` is an ``nn.Linear``; ``load_state_dict`` also takes a taming checkpoint's
    convolution weight ``proj.weight`` of shape ``(K, C, 1, 1)``.
    """

    def __init__(self, in_channels, num_codes, dim, *, tau=1.0, straight_through=True, kl_weight=5e-4,
                 learn_tau=False, channel_dim=1, taming_outputs=False, device=None, dtype=None):
        super().__init__()
        in_channels, num_codes, dim = (check_size(name, value) for name, value in
                                       (("in_channels", in_channels), ("num_codes", num_codes), ("dim", dim)))
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.num_codes, self.dim, self.channel_dim = in_channels, num_codes, dim, channel_dim
        self.straight_through, self.kl_weight, self.taming_outputs = straight_through, kl_weight, taming_outputs
        self.proj = nn.Linear(in_channels, num_codes, **factory)
        self.embed = nn.Embedding(num_codes, dim, **factory)
        self.tau = nn.Parameter(torch.tensor(float(tau), **factory)) if learn_tau else tau
        self.register_load_state_dict_pre_hook(_taming_projection)

    def forward(self, x):
        check_float("x", x)
        channel_dim = check_dim("channel_dim", self.channel_dim, x.dim())
        if x.shape[channel_dim] != self.in_channels:
            raise ValueError(f"x has {x.shape[channel_dim]} features along channel_dim={self.channel_dim}, "
                             f"but the quantizer takes in_channels={self.in_channels}")
        # One row of features per position: the projection is then one addmm with its bias
        # fused (a >2-d input costs Linear a separate (N, K) bias pass), and the sample and
        # the mixing need no transposed copy.
        positions = x.movedim(channel_dim, -1)
        logits = self.proj(positions.reshape(-1, self.in_channels))
        if self.training:
            quantized, indices, kl = gumbel_quantize_with_kl(logits, self.embed.weight, self.tau,
                                                             hard=self.straight_through)
            # the mean over positions as categorical_kl's: accumulated in float64
            mean_kl = (kl.sum(dtype=torch.float64) / max(kl.numel(), 1)).to(logits.dtype)
        else:
            indices = logits.argmax(dim=-1)
            quantized = self.embed(indices)
            mean_kl = ops.categorical_kl(logits, dim=-1, reduction="mean")
        loss = self.kl_weight * mean_kl
        indices = indices.reshape(positions.shape[:-1])
        quantized = quantized.reshape(positions.shape[:-1] + (self.dim,)).movedim(-1, channel_dim)
        if self.taming_outputs:
            return quantized, loss, (None, None, indices)
        return quantized, indices, loss

    def extra_repr(self):
        # a learned tau is a parameter: its value is in the state, not the repr
        tau = "learn_tau=True" if isinstance(self.tau, nn.Parameter) else f"tau={self.tau}"
        return (f"in_channels={self.in_channels}, num_codes={self.num_codes}, dim={self.dim}, {tau}, "
                f"straight_through={self.straight_through}, kl_weight={self.kl_weight}, "
                f"channel_dim={self.channel_dim}")


def _taming_projection(module, state_dict, prefix, *args):
    """A taming ``GumbelQuantize`` checkpoint's ``proj`` is a 1x1 convolution: its
    ``(K, C, 1, 1)`` weight is this layer's ``(K, C)`` linear weight."""
    key = prefix + "proj.weight"
    weight = state_dict.get(key)
    if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        state_dict[key] = weight.flatten(1)
