"""What the examples share: the data (scikit-learn's handwritten digits), the training loop
(tqdm bar, step timing), the command line and the PNG output.

Every example takes ``--reference``: the same model with the textbook PyTorch expressions in
place of fastvae's layers, so the two step times (and final losses) can be compared.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_SIZE = 297  # of load_digits' 1797 images; the other 1500 train


def parser(description, epochs, lr=2e-3, batch_size=100):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reference", action="store_true",
                   help="the same model with textbook PyTorch expressions in place of fastvae")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (a quick check)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the PNGs and metrics.json (default: examples/output/<run>/)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: these models are too small to gain from more, and on a busy "
                        "machine a second thread waiting for a core slowed steps 10-100x)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def setup(args, name):
    """Seed, thread count; returns the output folder ``args.out``, else
    ``examples/output/<name>[-reference]/`` (created)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    path = args.out or os.path.join(HERE, "output", name + ("-reference" if args.reference else ""))
    os.makedirs(path, exist_ok=True)
    return path


def load_digits(device, size=8):
    """scikit-learn's 8x8 digits as ``(train_x, train_y, test_x, test_y)``: images
    ``(N, 1, size, size)`` in [0, 1] (bilinearly upsampled when ``size`` > 8), labels int64.
    The split is fixed (the first 1500 images train), whatever the seed."""
    from sklearn.datasets import load_digits as digits

    data = digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target, dtype=torch.int64)
    split = len(x) - TEST_SIZE
    return x[:split].to(device), y[:split].to(device), x[split:].to(device), y[split:].to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train(args, model, step, train_x, train_y, desc):
    """Adam over shuffled mini-batches for ``args.epochs`` (or ``args.steps``) steps;
    ``step(x, y, index, total)`` returns ``(loss, {name: float})`` of one batch. Returns the
    per-step losses and the median step time in ms (forward, backward and optimizer step,
    the first 10 steps left out as warm-up)."""
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches_per_epoch = len(train_x) // args.batch_size
    total = args.steps or args.epochs * batches_per_epoch
    losses, seconds = [], []
    bar = tqdm(total=total, desc=desc, unit="step", disable=args.no_progress, dynamic_ncols=True)
    model.train()
    index = 0
    while index < total:
        order = torch.randperm(len(train_x), device=train_x.device)
        for batch in order[:batches_per_epoch * args.batch_size].view(batches_per_epoch, -1):
            if index == total:
                break
            _sync(args.device)
            start = time.perf_counter()
            loss, logs = step(train_x[batch], train_y[batch], index, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(args.device)
            seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            index += 1
            bar.update(1)
            if index % 10 == 0:
                bar.set_postfix(loss=f"{statistics.fmean(losses[-10:]):.4g}",
                                **{k: f"{v:.3g}" for k, v in logs.items()})
    bar.close()
    model.eval()
    timed = seconds[10:] or seconds
    return losses, 1e3 * statistics.median(timed)


def save_grid(images, path, columns, scale=4):
    """A PNG tiling ``images`` ``(N, 1, H, W)`` in [0, 1], ``columns`` a row, pixels
    enlarged ``scale`` times, a one-pixel grey border around each."""
    import matplotlib.pyplot as plt

    images = images.detach().float().clamp(0, 1).cpu().numpy()[:, 0]
    n, h, w = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 0.5, dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = image
    plt.imsave(path, np.kron(grid, np.ones((scale, scale), dtype=np.float32)), cmap="gray", vmin=0, vmax=1)
    return path


def reconstruction_grid(originals, reconstructions, path, columns=16):
    """Rows of ``columns`` test images, each row followed by its reconstructions."""
    rows = []
    for start in range(0, len(originals), columns):
        rows += [originals[start:start + columns], reconstructions[start:start + columns]]
    return save_grid(torch.cat(rows), path, columns)


def report(name, args, out, losses, step_ms, metrics):
    """Print the final metrics and the step time, write them to ``out/metrics.json`` and
    return them (``first_loss``/``final_loss``: the training loss averaged over the first
    and the last 50 steps, a quarter of the steps in shorter runs)."""
    window = max(1, min(50, len(losses) // 4))  # training losses are averaged over this many steps
    metrics = {"example": name, "fastvae": not args.reference, "device": args.device, "seed": args.seed,
               "steps": len(losses), "first_loss": statistics.fmean(losses[:window]),
               "final_loss": statistics.fmean(losses[-window:]), "median_step_ms": step_ms, **metrics}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    kind = "textbook PyTorch (--reference)" if args.reference else "fastvae"
    print(f"\n{name} with {kind} on {args.device}, {len(losses)} steps, median step {step_ms:.2f} ms")
    for key, value in metrics.items():
        if isinstance(value, float) and key != "median_step_ms":
            print(f"  {key:<24}{value:.4f}")
    print(f"  images and metrics.json in {out}")
    return metrics
