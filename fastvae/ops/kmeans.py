"""VQ column: k-means (Lloyd's), the codebook initialisation of VectorQuantizer(kmeans_init=True).

Assignment is :func:`fastvae.nearest_code` (the VQ search kernel, never an ``(N, K)``
matrix); the update is the ``segment_mean`` backend op, a deterministic segment mean
(native: counting sort by cluster, each cluster's rows summed in row order; Triton on GPU:
the same sorted grouping through torch ops around the search kernel; torch: ``index_add_``).
"""
import torch

from ._common import check_float, check_size, define
from .vq import nearest_code

_segment_mean = define(
    "segment_mean(Tensor x, Tensor indices, int num_segments) -> (Tensor, Tensor)",
    lambda x, indices, num_segments: (x.new_empty((num_segments, x.shape[1]), dtype=torch.float32),
                                      indices.new_empty((num_segments,))))


def segment_mean(x, indices, num_segments):
    """``(means, counts)``: the mean of the rows of ``x`` ``(N, D)`` assigned to each of
    ``num_segments`` segments by ``indices`` ``(N,)`` (0 for an empty one; float32, or
    float64 for float64 ``x``) and the int64 counts; summed in a fixed order."""
    return _segment_mean(x, indices, num_segments)


def kmeans(x, num_clusters, *, iters=10, generator=None):
    """Lloyd's k-means of the rows of ``x`` ``(N, D)``: ``(centroids, indices)``.

    The initial centroids are ``num_clusters`` distinct rows of ``x`` drawn from
    ``generator`` (PyTorch's default generator when ``None``). Each of the ``iters``
    iterations assigns every row to its nearest centroid (:func:`fastvae.nearest_code`)
    and moves each centroid to the mean of its rows; a cluster left empty is re-seeded
    with a row of ``x`` drawn from ``generator``. ``centroids`` is ``(num_clusters, D)``
    float32; ``indices`` ``(N,)`` int64 is the assignment to the returned centroids. The
    result depends only on ``x``, the generator's state and the backend's rounding: no
    float atomics, no host sync inside the loop.
    """
    check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
    num_clusters = check_size("num_clusters", num_clusters)
    if num_clusters > x.shape[0]:
        raise ValueError(f"num_clusters ({num_clusters}) exceeds the number of rows of x ({x.shape[0]}); "
                         "k-means needs at least one row per cluster")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    data = x.detach()
    data = data.float() if data.dtype != torch.float64 else data
    rng_device = generator.device if generator is not None else "cpu"
    start = torch.randperm(data.shape[0], generator=generator, device=rng_device)[:num_clusters].to(x.device)
    centroids = data[start].float()
    for _ in range(iters):
        indices, _ = nearest_code(data, centroids.to(data.dtype))
        means, counts = _segment_mean(data, indices, num_clusters)
        reseed = data[torch.randint(data.shape[0], (num_clusters,), generator=generator, device=rng_device)
                      .to(x.device)].float()
        centroids = torch.where((counts > 0)[:, None], means.float(), reseed)
    indices, _ = nearest_code(data, centroids.to(data.dtype))
    return centroids, indices
