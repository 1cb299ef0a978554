"""VQ tokenizer layers (issue 11's targets) against the peers users switch from.

    python benchmarks/bench_tokenizer.py [--device cpu] [--full] [--samples 3]

The default and --quick suites on a CPU run the residual and cosine cases at a tenth and an
eighth of the tokens, k-means at the first shape with an eighth of the rows and a quarter of
the clusters.

* residual VQ forward+backward at EnCodec's shape (N=24000, D=128, K=1024, R=8), commitment
  1, training mode, like with like in two cases. Gradient-trained codebooks:
  ``fastvae.nn.ResidualVectorQuantizer`` against eight sequential ``fastvae.vector_quantize``
  calls, each on the residual the previous left, losses summed (target: no slower), and
  ``fastvae.residual_quantize``, the op alone. EMA codebooks (decay 0.8): the layer against
  eight sequential EMA ``VectorQuantizer`` layers (target: no slower) and
  vector-quantize-pytorch's ``ResidualVQ`` (same options, rotation trick off; target: >= 5x).
  Where the time goes: the R searches (``residual_quantize``'s forward) take nearly all of
  it; fusion saves launches and passes over memory, not FLOPs. The backward is one pass
  over x (grad_x, residuals rebuilt in cache) plus, for gradient codebooks, one chunked
  pass for the codebooks' sums; an EMA layer's statistics are one more such pass
  (``residual_segment_sums``), then small (K, D) updates per stage.
* ``fastvae.kmeans`` (10 iterations, same initial centroids) against ``faiss.Kmeans`` and
  scikit-learn's ``KMeans(algorithm="lloyd", n_init=1, tol=0)`` at (65536, 1024, 256) and
  (262144, 16384, 8). Target at the first: >= faiss.
* ``VectorQuantizer(cosine=True, codebook_dim=8)``, 16384 codes, forward+backward at (32768
  tokens, dim 256) (LlamaGen), against ``VectorQuantize(use_cosine_sim=True,
  codebook_dim=8)`` with the same options. Target: >= 5x.
Peers are optional: a missing one's column is skipped with a note.
"""
import torch

import fastvae
import harness
from harness import Case, add_peer

KMEANS_SHAPES = [(65536, 1024, 256), (262144, 16384, 8)]


def _peer(module, name):
    try:
        return __import__(module, fromlist=[name]), None
    except ImportError:
        return None, f"{module} not installed: its column is skipped"


def _training_step(layer, x, loss_of):
    """forward + backward of one training call, gradients reset."""
    leaf = x.detach().clone().requires_grad_()

    def step():
        layer.zero_grad(set_to_none=True)
        leaf.grad = None
        out = layer(leaf)
        (out[0].float().sum() + loss_of(out)).backward()

    return step


def _sequential_vq(quantize, x, stages):
    """``stages`` quantizer calls in sequence, each on the residual the earlier ones left
    (``quantize(residual, stage) -> (quantized, loss)``), the losses summed; forward+backward."""
    def step():
        x.grad = None
        residual, total, loss = x, 0, 0
        for stage in range(stages):
            quantized, stage_loss = quantize(residual, stage)
            total, loss = total + quantized, loss + stage_loss
            residual = residual - quantized.detach()
        (total.sum() + loss).backward()

    return step


def _residual_layer(r, k, d, codebooks, ema_decay, device):
    layer = fastvae.nn.ResidualVectorQuantizer(r, k, d, beta=1.0, ema_decay=ema_decay).to(device)
    with torch.no_grad():
        for stage, codebook in zip(layer.stages, codebooks):
            stage.codebook.copy_(codebook)
            if ema_decay is not None:
                stage.ema_sum.copy_(codebook)
    return layer


def residual_cases(args):
    n, d, k, r = (24000 if harness.suite(args) == "full" else 2400), 128, 1024, 8
    x = torch.randn(n, d, device=args.device)
    codebooks = torch.randn(r, k, d, device=args.device) * torch.logspace(0, -1, r, device=args.device)[:, None, None]
    flops = 2 * n * k * d * r
    leaf_x = x.clone().requires_grad_()
    # Gradient-trained codebooks: the layer against the same math as eight vector_quantize calls.
    ours = _residual_layer(r, k, d, codebooks, None, args.device)
    leaf_cb = codebooks.clone().requires_grad_()

    def fused_op():
        leaf_x.grad = leaf_cb.grad = None
        quantized, _, losses = fastvae.residual_quantize(leaf_x, leaf_cb, beta=1.0)
        (quantized.sum() + losses.sum()).backward()

    def vector_quantize(residual, stage):
        quantized, _, loss = fastvae.vector_quantize(residual, leaf_cb[stage], beta=1.0)
        return quantized, loss

    candidates = {"fastvae ResidualVQ layer": _training_step(ours, x, lambda out: out[2].sum()),
                  "op: residual_quantize": fused_op,
                  "op: 8 x vector_quantize": _sequential_vq(vector_quantize, leaf_x, r)}
    yield Case("residual_vq gradient codebooks", (n, d, k, r), candidates, flops=flops, device=args.device,
               mode="forward+backward", memory=True, max_samples=5,
               targets=[("op: 8 x vector_quantize", 1.0, "no slower than 8 sequential vector_quantize calls")])
    # EMA codebooks (decay 0.8, as the peer): against eight EMA VectorQuantizer layers and ResidualVQ.
    ours = _residual_layer(r, k, d, codebooks, 0.8, args.device)
    singles = [fastvae.nn.VectorQuantizer(k, d, beta=1.0, ema_decay=0.8).to(args.device) for _ in range(r)]
    for single, stage in zip(singles, ours.stages):
        single.load_state_dict(stage.state_dict())

    def ema_layer(residual, stage):
        quantized, _, loss = singles[stage](residual)
        return quantized, loss

    candidates = {"fastvae ResidualVQ layer (EMA)": _training_step(ours, x, lambda out: out[2].sum()),
                  "8 x VectorQuantizer (EMA)": _sequential_vq(ema_layer, leaf_x, r)}
    module, note = _peer("vector_quantize_pytorch", "ResidualVQ")
    if module is not None:
        peer = module.ResidualVQ(dim=d, codebook_size=k, num_quantizers=r, decay=0.8, commitment_weight=1.0,
                                 rotation_trick=False).to(args.device)
        with torch.no_grad():
            for layer, codebook in zip(peer.layers, codebooks):
                layer._codebook.embed.copy_(codebook[None])
                layer._codebook.embed_avg.copy_(codebook[None])
        add_peer(candidates, "vector-quantize-pytorch ResidualVQ",
                 (_training_step(peer, x[None], lambda out: out[2].sum()), None))
    else:
        print(note)
    targets = [("8 x VectorQuantizer (EMA)", 1.0, "no slower than 8 sequential EMA VectorQuantizer calls")]
    if module is not None:
        targets.append(("vector-quantize-pytorch ResidualVQ", 5.0, ">= 5x vector-quantize-pytorch ResidualVQ"))
    yield Case("residual_vq EMA", (n, d, k, r), candidates, flops=flops, device=args.device,
               mode="forward+backward", memory=True, max_samples=5, targets=targets)


def kmeans_cases(args):
    full = harness.suite(args) == "full"
    for n, k, d in KMEANS_SHAPES if full else KMEANS_SHAPES[:1]:
        n, k = (n, k) if full else (n // 8, k // 4)
        x = torch.randn(n, d, device=args.device)
        init = x[torch.randperm(n, device=args.device)[:k]].clone()
        candidates = {"fastvae.kmeans": lambda: fastvae.kmeans(x, k, iters=10)}
        faiss, note = _peer("faiss", "Kmeans")
        if faiss is not None and args.device == "cpu":
            data, centroids = x.numpy(), init.numpy()

            def run_faiss():
                km = faiss.Kmeans(d, k, niter=10, max_points_per_centroid=n, min_points_per_centroid=1)
                km.train(data, init_centroids=centroids)
                return km.index.search(data, 1)  # the final assignment, as fastvae returns

            candidates["faiss Kmeans"] = run_faiss
        elif note:
            print(note)
        sklearn, note = _peer("sklearn.cluster", "KMeans")
        if sklearn is not None and args.device == "cpu" and n * k * d < 10**11:
            candidates["scikit-learn KMeans"] = lambda: sklearn.KMeans(
                k, init=init.numpy(), n_init=1, max_iter=10, tol=0.0, algorithm="lloyd").fit(x.numpy())
        elif note or sklearn is not None:
            print(note or f"scikit-learn skipped at {(n, k, d)}: minutes per fit on this CPU")
        targets = [("faiss Kmeans", 1.0, ">= faiss Kmeans")] if (n, k, d) == KMEANS_SHAPES[0] else []
        yield Case("kmeans 10 iters", (n, k, d), candidates, flops=11 * 2 * n * k * d, device=args.device,
                   max_samples=3, targets=targets)


def cosine_cases(args):
    n, d, k, cd = (32768 if harness.suite(args) == "full" else 4096), 256, 16384, 8
    x = torch.randn(n, d, device=args.device)
    ours = fastvae.nn.VectorQuantizer(k, d, beta=1.0, ema_decay=0.8, cosine=True, codebook_dim=cd,
                                      estimator="rotation", codebook_init="kaiming").to(args.device)
    candidates = {"fastvae VectorQuantizer": _training_step(ours, x, lambda out: out[2])}
    module, note = _peer("vector_quantize_pytorch", "VectorQuantize")
    if module is not None:
        peer = module.VectorQuantize(dim=d, codebook_size=k, codebook_dim=cd, use_cosine_sim=True, decay=0.8,
                                     commitment_weight=1.0, rotation_trick=True).to(args.device)
        candidates["vector-quantize-pytorch"] = _training_step(peer, x[None], lambda out: out[2].sum())
    else:
        print(note)
    yield Case("cosine VQ codebook_dim=8", (n, d, k), candidates, flops=2 * n * k * cd, device=args.device,
               mode="forward+backward", memory=True, max_samples=5,
               targets=[("vector-quantize-pytorch", 5.0, ">= 5x vector-quantize-pytorch VectorQuantize")])


def cases(args):
    yield from residual_cases(args)
    yield from kmeans_cases(args)
    yield from cosine_cases(args)


if __name__ == "__main__":
    harness.main("tokenizer", cases, __doc__)
