"""VQ column: nearest_code and vector_quantize forward against what users run today.

    python benchmarks/bench_vq.py [--device cuda] [--quick] [--samples 3] [--dtypes float32,bfloat16]

nearest_code: ``torch.cdist(x, e).argmin(1)``, the matmul expansion
``(||e||^2 - 2 x e^T).argmin(1)`` in eager and under torch.compile, and faiss
``IndexFlatL2`` (CPU, k=1). vector_quantize forward: the eager textbook layer (expansion,
argmin, gather, loss) and ``vector_quantize_pytorch.VectorQuantize`` (eval, no grad).
Peer packages are optional: a missing one's column is skipped with a note. Floor: the
``2 N K D`` FLOPs of the distance GEMM over the measured float32 matrix rate. Peak memory
is measured per candidate (O(N) for fastvae; the alternatives hold the (N, K) matrix);
``vector_quantize`` also runs at a fixed (N, D) as K grows (``MEMORY_SWEEP``: the
memory figure of ``plots.py``).
"""
import itertools

import torch

import fastvae
import harness
from harness import Case, add_peer, compiled, fastvae_candidates

SHAPES = [(16384, 1024, 256), (65536, 8192, 256), (65536, 16384, 8), (131072, 512, 64)]
CPU_DEFAULT_SHAPES = SHAPES[:1]  # the default suite's (see harness.shapes)
# vector_quantize at N=16384, D=32 as K grows. On a CPU the peak is read from the resident
# set, which sees fresh mappings only: glibc serves blocks up to 32 MiB from memory it
# already holds (a 32 MiB matrix measured 0), so the smallest (N, K) matrix here is 64 MiB.
# vector-quantize-pytorch peaks near 1 GiB at the largest K.
MEMORY_SWEEP = [(16384, k, 32) for k in (1024, 2048, 4096)]
# Above this many FLOPs the slow alternatives take seconds a call on a CPU: 3 samples.
LARGE_FLOPS = 10**11


def eager_nearest(x, codebook):
    return torch.addmm((codebook * codebook).sum(1), x, codebook.t(), alpha=-2.0).argmin(1)


def cdist_nearest(x, codebook):
    return torch.cdist(x, codebook).argmin(1)


def eager_vector_quantize(x, codebook, beta=0.25):
    indices = eager_nearest(x, codebook)
    quantized = codebook[indices]
    mse = torch.nn.functional.mse_loss(quantized, x)
    return x + (quantized - x), indices, (1.0 + beta) * mse


def faiss_candidate(x, codebook):
    """faiss IndexFlatL2 search with k=1, or a note saying why it is skipped."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None, "faiss: CPU float32 only here"
    try:
        import faiss
    except ImportError:
        return None, "faiss not installed (pip install faiss-cpu): column skipped"
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.numpy())
    queries = x.numpy()
    return (lambda: index.search(queries, 1)), None


# vector-quantize-pytorch peaks at about four (N, K) float32 matrices (8 GiB at
# (65536, 8192)); above this the column is skipped rather than risk the OOM killer.
VQP_MAX_BYTES = 10 * 2**30


def vqp_candidate(x, codebook):
    """vector_quantize_pytorch.VectorQuantize forward (eval, no grad) on our codebook."""
    if 4 * 4 * x.shape[0] * codebook.shape[0] > VQP_MAX_BYTES:
        return None, f"vector-quantize-pytorch skipped at {tuple(x.shape)} x {tuple(codebook.shape)}: about " \
                     f"{16 * x.shape[0] * codebook.shape[0] / 2**30:.0f} GiB of (N, K) temporaries"
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None, "vector-quantize-pytorch not installed: column skipped"
    layer = VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0]).to(x.device).eval()
    with torch.no_grad():
        layer._codebook.embed.copy_(codebook[None])
    batch = x[None]  # (1, N, D)

    def run():
        with torch.no_grad():
            return layer(batch)

    return run, None


def cases(args):
    shapes = harness.shapes(args, SHAPES, CPU_DEFAULT_SHAPES)
    for dtype, (n, k, d) in itertools.product(harness.dtypes(args), shapes):
        x = torch.randn(n, d, device=args.device, dtype=dtype)
        codebook = torch.randn(k, d, device=args.device, dtype=dtype)
        flops = 2 * n * k * d

        candidates = fastvae_candidates(lambda: fastvae.nearest_code(x, codebook), args.device, ["nearest_code"])
        candidates["torch.cdist+argmin"] = lambda: cdist_nearest(x, codebook)
        candidates["matmul expansion eager"] = lambda: eager_nearest(x, codebook)
        comp = compiled(eager_nearest, args)
        if comp is not None:
            candidates["matmul expansion compile"] = lambda: comp(x, codebook)
        add_peer(candidates, "faiss IndexFlatL2", faiss_candidate(x, codebook))
        max_samples = 3 if flops > LARGE_FLOPS and not args.device.startswith("cuda") else None
        yield Case("nearest_code", (n, k, d), candidates, flops=flops, device=args.device, dtype=dtype, memory=True,
                   max_samples=max_samples)

        yield vector_quantize_case(x, codebook, args, max_samples)
    if harness.suite(args) != "quick":
        for dtype, (n, k, d) in itertools.product(harness.dtypes(args), MEMORY_SWEEP):
            x = torch.randn(n, d, device=args.device, dtype=dtype)
            yield vector_quantize_case(x, torch.randn(k, d, device=args.device, dtype=dtype), args, max_samples=3)


def vector_quantize_case(x, codebook, args, max_samples):
    """vector_quantize forward against the eager layer and vector-quantize-pytorch, with peak memory."""
    candidates = fastvae_candidates(lambda: fastvae.vector_quantize(x, codebook), args.device, ["vector_quantize"])
    candidates["eager VQ layer"] = lambda: eager_vector_quantize(x, codebook)
    add_peer(candidates, "vector-quantize-pytorch", vqp_candidate(x, codebook))
    return Case("vector_quantize", (x.shape[0], codebook.shape[0], x.shape[1]), candidates,
                flops=2 * x.shape[0] * codebook.shape[0] * x.shape[1], device=args.device, dtype=x.dtype,
                memory=True, max_samples=max_samples)


if __name__ == "__main__":
    harness.main("vq", cases, __doc__)
