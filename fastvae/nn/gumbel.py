"""Gumbel column layers: the Gumbel-Softmax sample."""
from torch import nn

from .. import ops


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
