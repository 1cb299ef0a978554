"""A VQ-VAE on scikit-learn's 8x8 digits, with fastvae's vector quantizer.

    python examples/vqvae.py                  # EMA codebook, k-means init, dead-code restarts
    python examples/vqvae.py --residual 4     # residual VQ: 4 stages (SoundStream / EnCodec)
    python examples/vqvae.py --reference      # either with a textbook PyTorch quantizer

Conv encoder (8x8 -> a 4x4 grid of 16-dim vectors), quantizer, conv decoder; MSE
reconstruction. fastvae's part is ``fastvae.nn.VectorQuantizer`` (or
``ResidualVectorQuantizer``) with ``ema_decay``, ``kmeans_init`` and
``dead_code_threshold``: the search never builds the (N, K) distance matrix. The reference
is the same quantizer written as textbook PyTorch (the distance matrix, argmin, EMA with
Laplace smoothing, Lloyd k-means, restarts from the batch). Writes reconstructions.png,
samples.png (codes drawn from each grid position's code frequencies in the training set:
there is no learned prior), codebook-usage.png and metrics.json.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

import _common
import fastvae.nn


class TextbookVQ(nn.Module):
    """VQ-VAE quantizer with an EMA codebook (Laplace-smoothed), k-means initialisation on
    the first training batch and dead-code restarts, in plain PyTorch. ``(..., D)`` input,
    returns ``(quantized, indices, commitment loss)`` as fastvae's layer."""

    def __init__(self, num_codes, dim, beta, decay, threshold, kmeans_iters=10, eps=1e-5):
        super().__init__()
        self.beta, self.decay, self.threshold, self.kmeans_iters, self.eps = beta, decay, threshold, kmeans_iters, eps
        self.register_buffer("codebook", torch.rand(num_codes, dim) * 2 / num_codes - 1 / num_codes)
        self.register_buffer("ema_count", torch.full((num_codes,), max(1.0, threshold)))
        self.register_buffer("ema_sum", self.codebook * self.ema_count[:, None])
        self.register_buffer("usage_count", torch.zeros(num_codes, dtype=torch.int64))
        self.initialized = False

    def nearest(self, flat):
        distances = (flat * flat).sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + (self.codebook ** 2).sum(1)
        return distances.argmin(1)

    @torch.no_grad()
    def kmeans_init(self, flat):
        self.codebook.copy_(flat[torch.randperm(len(flat), device=flat.device)[:len(self.codebook)]])
        for _ in range(self.kmeans_iters):
            one_hot = F.one_hot(self.nearest(flat), len(self.codebook)).float()
            counts = one_hot.sum(0)
            means = one_hot.t() @ flat / counts.clamp(min=1)[:, None]
            self.codebook.copy_(torch.where(counts[:, None] > 0, means, self.codebook))
        # the EMA starts from the final assignment's counts (as vector-quantize-pytorch)
        self.ema_count.copy_(F.one_hot(self.nearest(flat), len(self.codebook)).float().sum(0))
        self.ema_sum.copy_(self.codebook * self.ema_count[:, None])
        self.initialized = True

    @torch.no_grad()
    def restart_dead_codes(self, flat):
        dead = self.ema_count < self.threshold
        replacements = flat[torch.randint(len(flat), (len(self.codebook),), device=flat.device)]
        self.codebook.copy_(torch.where(dead[:, None], replacements, self.codebook))
        self.ema_count.copy_(torch.where(dead, torch.full_like(self.ema_count, self.threshold), self.ema_count))
        self.ema_sum.copy_(torch.where(dead[:, None], self.codebook * self.threshold, self.ema_sum))

    @torch.no_grad()
    def ema_update(self, flat, indices):
        one_hot = F.one_hot(indices, len(self.codebook)).float()
        self.ema_count.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(one_hot.t() @ flat, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + len(self.codebook) * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self.usage_count += one_hot.sum(0).long()

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if self.training and not self.initialized:
            self.kmeans_init(flat.detach())
        if self.training and self.threshold > 0:
            self.restart_dead_codes(flat.detach())
        indices = self.nearest(flat)
        codes = self.codebook[indices]
        loss = self.beta * F.mse_loss(flat, codes)
        if self.training:
            self.ema_update(flat.detach(), indices)
        quantized = flat + (codes - flat).detach()
        return quantized.view_as(x), indices.view(x.shape[:-1]), loss


class TextbookResidualVQ(nn.Module):
    """Residual VQ: each stage a TextbookVQ of the residual the earlier stages leave."""

    def __init__(self, stages, *args):
        super().__init__()
        self.stages = nn.ModuleList(TextbookVQ(*args) for _ in range(stages))

    def forward(self, x):
        residual, total, indices, losses = x, 0, [], []
        for stage in self.stages:
            quantized, index, loss = stage(residual)
            total, residual = total + quantized, residual - quantized.detach()
            indices.append(index)
            losses.append(loss)
        quantized = x + (total - x).detach()
        return quantized, torch.stack(indices, -1), torch.stack(losses)


def quantizer(args):
    options = dict(beta=args.beta, ema_decay=args.decay, dead_code_threshold=args.dead_threshold, kmeans_init=True)
    if args.reference:
        textbook = (args.codes, args.dim, args.beta, args.decay, args.dead_threshold)
        return TextbookResidualVQ(args.residual, *textbook) if args.residual else TextbookVQ(*textbook)
    if args.residual:
        return fastvae.nn.ResidualVectorQuantizer(args.residual, args.codes, args.dim, **options)
    return fastvae.nn.VectorQuantizer(args.codes, args.dim, **options)


class VQVAE(nn.Module):
    def __init__(self, args, hidden=64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1),
            nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, args.dim, 1))
        self.quantizer = quantizer(args)
        self.decoder = nn.Sequential(
            nn.Conv2d(args.dim, hidden, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def quantize(self, h):
        """Channel-last codes of the (B, D, 4, 4) encoding: quantized (B, D, 4, 4), indices, loss."""
        quantized, indices, loss = self.quantizer(h.permute(0, 2, 3, 1))
        return quantized.permute(0, 3, 1, 2), indices, loss.sum()

    def forward(self, x):
        quantized, indices, loss = self.quantize(self.encoder(x))
        return self.decoder(quantized), indices, loss


def codes_to_vectors(model, indices):
    """Decoder input for code indices (B, 4, 4[, R])."""
    stages = model.quantizer.stages if hasattr(model.quantizer, "stages") else [model.quantizer]
    if indices.dim() == 3:
        indices = indices[..., None]
    return sum(stage.codebook[indices[..., r]] for r, stage in enumerate(stages)).permute(0, 3, 1, 2)


def usage_plot(model, path):
    import matplotlib.pyplot as plt

    stages = model.quantizer.stages if hasattr(model.quantizer, "stages") else [model.quantizer]
    fig, ax = plt.subplots(figsize=(7, 3))
    for r, stage in enumerate(stages):
        usage = stage.usage_count.float()
        ax.plot(torch.sort(usage / usage.sum(), descending=True).values.cpu(), label=f"stage {r}")
    ax.set_xlabel("code (most used first)")
    ax.set_ylabel("share of assignments")
    ax.set_title("codebook usage over training")
    if len(stages) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    p = _common.parser(__doc__, epochs=100)
    p.add_argument("--residual", type=int, default=0, help="residual VQ with this many stages (0: plain VQ)")
    p.add_argument("--codes", type=int, default=64)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--decay", type=float, default=0.95, help="EMA decay of the codebook")
    p.add_argument("--dead-threshold", type=float, default=1.0,
                   help="restart a code whose running assignments per step fall below this")
    args = p.parse_args(argv)
    name = f"rvqvae{args.residual}" if args.residual else "vqvae"
    out = _common.setup(args, name)
    train_x, train_y, test_x, _ = _common.load_digits(args.device)
    model = VQVAE(args).to(args.device)

    def step(x, y, index, total):
        reconstruction, _, vq_loss = model(x)
        return F.mse_loss(reconstruction, x) + vq_loss, {"vq": vq_loss.item()}

    losses, step_ms = _common.train(args, model, step, train_x, train_y, f"{name}{' (reference)' * args.reference}")

    with torch.no_grad():
        reconstruction, indices, _ = model(test_x)
        mse = F.mse_loss(reconstruction, test_x)
        _common.reconstruction_grid(test_x[:64], reconstruction[:64], f"{out}/reconstructions.png")
        # samples: each position's code drawn from its frequency over the training set
        _, train_indices, _ = model(train_x)
        flat = train_indices.reshape(len(train_x), -1)
        draws = torch.stack([flat[torch.randint(len(flat), (100,), device=args.device), j]
                             for j in range(flat.shape[1])], 1).view(100, *train_indices.shape[1:])
        _common.save_grid(model.decoder(codes_to_vectors(model, draws)), f"{out}/samples.png", columns=10)
        usage_plot(model, f"{out}/codebook-usage.png")
        stage_indices = indices.reshape(-1, max(args.residual, 1))
        used = [len(torch.unique(stage_indices[:, r])) / args.codes for r in range(stage_indices.shape[1])]
    return _common.report(name, args, out, losses, step_ms, {
        "test_mse": mse.item(), "test_codes_used": sum(used) / len(used)})


if __name__ == "__main__":
    main(sys.argv[1:])
