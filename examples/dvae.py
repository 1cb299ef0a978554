"""A discrete VAE (Gumbel-Softmax, Jang et al. 2017) on scikit-learn's 8x8 digits.

    python examples/dvae.py                   # soft samples in training
    python examples/dvae.py --hard            # straight-through one-hot samples
    python examples/dvae.py --reference       # either with torch.nn.functional.gumbel_softmax

MLP encoder to 20 categorical latents of 10 classes, MLP decoder from their one-hot samples,
Bernoulli likelihood. The temperature anneals from 1 to 0.5 (``tau = max(0.5, exp(-r
step))``) and the KL to the uniform prior is warmed up linearly over the first 30% of the
steps. fastvae's part is ``fastvae.gumbel_softmax`` (the noise never stored, no NaN) and
``fastvae.categorical_kl``. Writes reconstructions.png (test images, each row followed by
the reconstructions from each latent's most likely class), samples.png (uniform draws of
every latent) and metrics.json.
"""
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

import _common
import fastvae


def textbook_categorical_kl(logits):
    """KL(softmax(logits) || uniform) over the last dim, summed, over the batch size."""
    log_p = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p + math.log(logits.shape[-1]))).sum() / logits.shape[0]


def mlp(inputs, hidden, outputs):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, outputs))


class DiscreteVAE(nn.Module):
    def __init__(self, latents, classes, hidden=256, hard=False, reference=False):
        super().__init__()
        self.latents, self.classes, self.hard = latents, classes, hard
        self.encoder = mlp(64, hidden, latents * classes)
        self.decoder = mlp(latents * classes, hidden, 64)
        self.gumbel_softmax = F.gumbel_softmax if reference else fastvae.gumbel_softmax
        self.categorical_kl = textbook_categorical_kl if reference else fastvae.categorical_kl
        self.tau = 1.0

    def decode(self, one_hot):
        return self.decoder(one_hot.flatten(1)).view(-1, 1, 8, 8)

    def forward(self, x):
        logits = self.encoder(x.flatten(1)).view(-1, self.latents, self.classes)
        if self.training:
            sample = self.gumbel_softmax(logits, self.tau, self.hard)
        else:  # evaluation: each latent's most likely class, no noise
            sample = F.one_hot(logits.argmax(-1), self.classes).to(logits.dtype)
        return self.decode(sample), self.categorical_kl(logits)


def main(argv=None):
    p = _common.parser(__doc__, epochs=400)
    p.add_argument("--hard", action="store_true", help="straight-through one-hot samples in training")
    p.add_argument("--latents", type=int, default=20)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--tau-min", type=float, default=0.5)
    p.add_argument("--warmup", type=float, default=0.3, help="share of the steps over which the KL weight rises to 1")
    args = p.parse_args(argv)
    name = "dvae-hard" if args.hard else "dvae"
    out = _common.setup(args, name)
    train_x, train_y, test_x, _ = _common.load_digits(args.device)
    model = DiscreteVAE(args.latents, args.classes, hard=args.hard, reference=args.reference).to(args.device)

    def step(x, y, index, total):
        model.tau = max(args.tau_min, math.exp(-3.0 * index / total))  # reaches 0.5 at 23% of the steps
        kl_weight = min(1.0, index / max(1.0, args.warmup * total))
        logits, kl = model(x)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
        return recon + kl_weight * kl, {"kl": kl.item(), "tau": model.tau}

    losses, step_ms = _common.train(args, model, step, train_x, train_y, f"{name}{' (reference)' * args.reference}")

    with torch.no_grad():
        logits, kl = model(test_x)
        recon = F.binary_cross_entropy_with_logits(logits, test_x, reduction="sum") / len(test_x)
        _common.reconstruction_grid(test_x[:64], torch.sigmoid(logits[:64]), f"{out}/reconstructions.png")
        codes = torch.randint(args.classes, (100, args.latents), device=args.device)
        _common.save_grid(torch.sigmoid(model.decode(F.one_hot(codes, args.classes).float())), f"{out}/samples.png",
                          columns=10)
    return _common.report(name, args, out, losses, step_ms, {
        "test_recon_bce": recon.item(), "test_kl": kl.item(), "test_neg_elbo": (recon + kl).item(),
        "test_pixel_mse": F.mse_loss(torch.sigmoid(logits), test_x).item()})


if __name__ == "__main__":
    main(sys.argv[1:])
