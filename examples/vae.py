"""A VAE on scikit-learn's 8x8 digits, with fastvae's fused Gaussian layer.

    python examples/vae.py                    # VAE
    python examples/vae.py --beta 4           # beta-VAE (KL weighted by beta)
    python examples/vae.py --conditional      # CVAE: encoder and decoder see the digit's label
    python examples/vae.py --reference        # any of them with the textbook PyTorch expressions

MLP encoder and decoder (64 -> 256 -> 256 -> latent), Bernoulli likelihood on the pixel
intensities. fastvae's part is ``fastvae.reparameterize_kl``: the sample and the KL in one
pass, the noise made in registers and never stored. Writes reconstructions.png (test images,
each row followed by its reconstructions), samples.png (decoded draws from the prior; for
the CVAE a row per digit) and metrics.json.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

import _common
import fastvae


def textbook_reparameterize_kl(mu, logvar):
    """The expressions fastvae.reparameterize_kl replaces (batchmean KL)."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1.0 - logvar) / mu.shape[0]
    return z, kl


def mlp(inputs, hidden, outputs):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, outputs))


class VAE(nn.Module):
    def __init__(self, latent, hidden=256, classes=0, reference=False):
        super().__init__()
        self.classes, self.latent = classes, latent
        self.encoder = mlp(64 + classes, hidden, 2 * latent)
        self.decoder = mlp(latent + classes, hidden, 64)
        self.sample_and_kl = textbook_reparameterize_kl if reference else fastvae.reparameterize_kl

    def _condition(self, h, labels):
        return torch.cat([h, F.one_hot(labels, self.classes).to(h.dtype)], 1) if self.classes else h

    def decode(self, z, labels=None):
        """Pixel logits ``(B, 1, 8, 8)``."""
        return self.decoder(self._condition(z, labels)).view(-1, 1, 8, 8)

    def forward(self, x, labels=None):
        mu, logvar = self.encoder(self._condition(x.flatten(1), labels)).chunk(2, dim=1)
        if self.training:
            z, kl = self.sample_and_kl(mu, logvar)
        else:  # evaluation: the posterior mean, and the KL by the same layer
            z, kl = mu, self.sample_and_kl(mu, logvar)[1]
        return self.decode(z, labels), kl


def main(argv=None):
    p = _common.parser(__doc__, epochs=400)
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE for beta > 1)")
    p.add_argument("--conditional", action="store_true", help="CVAE: condition on the digit's label")
    p.add_argument("--latent", type=int, default=16)
    args = p.parse_args(argv)
    name = "cvae" if args.conditional else "beta-vae" if args.beta != 1.0 else "vae"
    out = _common.setup(args, name)
    train_x, train_y, test_x, test_y = _common.load_digits(args.device)
    model = VAE(args.latent, classes=10 if args.conditional else 0, reference=args.reference).to(args.device)

    def step(x, y, index, total):
        logits, kl = model(x, y)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
        return recon + args.beta * kl, {"kl": kl.item()}

    losses, step_ms = _common.train(args, model, step, train_x, train_y, f"{name}{' (reference)' * args.reference}")

    with torch.no_grad():
        logits, kl = model(test_x, test_y)
        recon = F.binary_cross_entropy_with_logits(logits, test_x, reduction="sum") / len(test_x)
        mse = F.mse_loss(torch.sigmoid(logits), test_x)
        _common.reconstruction_grid(test_x[:64], torch.sigmoid(logits[:64]), f"{out}/reconstructions.png")
        labels = torch.arange(10, device=args.device).repeat_interleave(10) if args.conditional else None
        z = torch.randn(100, args.latent, device=args.device)
        _common.save_grid(torch.sigmoid(model.decode(z, labels)), f"{out}/samples.png", columns=10)
    return _common.report(name, args, out, losses, step_ms, {
        "test_recon_bce": recon.item(), "test_kl": kl.item(), "test_neg_elbo": (recon + kl).item(),
        "test_pixel_mse": mse.item()})


if __name__ == "__main__":
    main(sys.argv[1:])
