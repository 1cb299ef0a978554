"""VQ column in Triton: nearest_code and vector_quantize (backward: vq_backward.py; residual VQ: residual_vq.py).

Codebook (``_codebook_kernel``): ``||e - c||^2`` of every code and their maximum, with
``c`` the codebook's mean: the search ranks centred vectors (same differences, smaller
norms, so a smaller error bound) except for 16-bit dots, whose centred values would not
be exact in 16 bits.

Search (``_search_kernel``): a program takes ``BLOCK_N`` rows and a range of codes (all
of them, or one split of them when there are too few row blocks to fill the device) and
ranks codes tile by tile by ``v = ||e||^2 - 2 x.e`` with ``tl.dot``, keeping per row the
three best ``v`` and the indices of the best two (ties to the lowest) in registers.
The ``(N, K)`` matrix never exists.

Resolve (``_resolve_kernel``): merges the splits in code order and makes the answer
exact. The expansion's rounding error is at most
``B = ROUNDING * (max ||e||^2 + 2 ||x|| max ||e||)``; a row whose second best is more
than ``2B`` above the best has the exact argmin. A row whose third best is, but not its
second, is decided by the exact float32 ``(x - e)^2`` of its two candidates. Only rows
with three or more codes within ``2B`` (duplicates, extreme norms) are rescanned exactly
over all codes, the codes split across programs when there are few row blocks. It then
gathers the winning code (``quantized`` is a copy of codebook rows) and its exact squared
distance (``_gather_kernel`` does, after merging the splits' rescans, when there are several).
A row whose bound is NaN or inf (a NaN or inf in ``x``, in a code, or an overflowing norm:
the codebook kernel's maximum counts a NaN norm as inf) is never certain, so it is
rescanned; the rescan ranks a NaN distance first (the first NaN code wins, as torch.argmin:
NaN in, NaN out), spelled out rather than left to ``min``, which drops NaN on a GPU, and
ties, all-inf rows included, go to the lowest index.

On CUDA a float32 dot runs as ``tf32x3`` (three tensor-core passes, close to float32)
and a float16/bfloat16 dot natively in 16 bits (their values are exact in tf32, so two of
three passes would add nothing) with float32 accumulation; under ``TRITON_INTERPRET=1`` it
is float32. ``ROUNDING`` (``_rounding``) follows a model of Hopper's tensor cores that
assumes the worst of each step: the accumulator *truncates* (chops) after every addition,
at most 2u of the running sum (u = 2^-24) instead of round-to-nearest's u, so a D-term
dot errs by up to 2D u sum|x_i e_i|; Triton's tf32x3 passes ``a - tf32(a)`` unrounded,
and the MMA reads it truncated to tf32, so with the dropped ``lo * lo`` term and ``hi``
parts possibly truncated too each product errs by up to 3 * 2^-20 = 48u of |x_i e_i|;
16-bit products are exact in float32. With ``||e||^2`` summed in float32 (D u ||e||^2),
the coefficient of ``max ||e||^2 + 2 ||x|| max ||e||`` is (2D + 52) u for tf32x3, (2D + 4) u
for the 16-bit dot and (D + 4) u for the interpreter's round-to-nearest float32; centring
in float32 (``x - c`` and ``e - c`` each rounded, u relative) adds 2u, for (2D + 54) u and
(D + 6) u. ``tests/test_gpu_readiness.py`` runs this model (chopped tf32 splits, chopped
accumulator) on adversarial inputs against the bound, and as the search's dot.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from .gaussian import SUM_BLOCK, _sum_kernel

_UNIT_ROUNDOFF = 2.0**-24
_TF32X3_PRODUCT_ROUNDINGS = 48  # 3 * 2^-20 per product, in units of u (module docstring)
_CENTRING_ROUNDINGS = 2  # x - c and e - c rounded to float32 (module docstring)
_INT32_MAX = tl.constexpr(2**31 - 1)  # kernels read only constexpr globals


@triton.jit
def _merge(best, second, third, index, second_index, c_best, c_second, c_third, c_index, c_second_index):
    """Running top three values (indices of the top two) absorbing those of later codes:
    equal values keep the earlier, lower index."""
    c_first = c_best < best
    # Second place: the better head of what remains of the two lists after first place.
    head, head_index = tl.where(c_first, best, second), tl.where(c_first, index, second_index)
    c_head, c_head_index = tl.where(c_first, c_second, c_best), tl.where(c_first, c_second_index, c_index)
    after_head, after_c_head = tl.where(c_first, second, third), tl.where(c_first, c_third, c_second)
    c_second_place = c_head < head
    third = tl.where(c_second_place, tl.minimum(head, after_c_head), tl.minimum(after_head, c_head))
    second = tl.where(c_second_place, c_head, head)
    second_index = tl.where(c_second_place, c_head_index, head_index)
    return tl.where(c_first, c_best, best), second, third, tl.where(c_first, c_index, index), second_index


@triton.jit
def _dot_operand(tile, centre, CENTRE: tl.constexpr, DOT_16BIT: tl.constexpr):
    """A loaded tile as the dot takes it: as loaded (16-bit), else float32, centred."""
    if not DOT_16BIT:
        tile = tile.to(tl.float32)
        if CENTRE:
            tile = tile - centre[None, :]
    return tile


@triton.jit
def _search_kernel(x_ptr, cb_ptr, centre_ptr, cb_sq_ptr, top_ptr, top_index_ptr, N, K, codes_per_split,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, CENTRE: tl.constexpr, DOT_16BIT: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * D passes 2^31
    row_ok = rows < N
    k_begin = split * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, K)
    dims = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    second, third = best, best
    index = tl.zeros((BLOCK_N,), tl.int32)
    second_index = index
    if D <= BLOCK_D:  # the row block stays in registers for the whole code range
        centre = tl.load(centre_ptr + dims, mask=CENTRE & (dims < D), other=0.0)
        x_tile = _dot_operand(tl.load(x_ptr + rows[:, None] * D + dims[None, :],
                                      mask=row_ok[:, None] & (dims[None, :] < D), other=0.0),
                              centre, CENTRE, DOT_16BIT)
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            d_ok = (d0 + dims) < D
            if D > BLOCK_D:
                centre = tl.load(centre_ptr + d0 + dims, mask=CENTRE & d_ok, other=0.0)
                x_tile = _dot_operand(tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :],
                                              mask=row_ok[:, None] & d_ok[None, :], other=0.0),
                                      centre, CENTRE, DOT_16BIT)
            e_tile = _dot_operand(tl.load(cb_ptr + codes.to(tl.int64)[:, None] * D + d0 + dims[None, :],
                                          mask=code_ok[:, None] & d_ok[None, :], other=0.0),
                                  centre, CENTRE, DOT_16BIT)
            acc = tl.dot(x_tile, tl.trans(e_tile), acc, input_precision=PRECISION)
        cb_sq = tl.load(cb_sq_ptr + codes, mask=code_ok, other=float("inf"))
        v = cb_sq[None, :] - 2.0 * acc
        tile_best = tl.min(v, axis=1)
        tile_index = tl.min(tl.where(v == tile_best[:, None], codes[None, :], _INT32_MAX), axis=1)
        v = tl.where(codes[None, :] == tile_index[:, None], float("inf"), v)
        tile_second = tl.min(v, axis=1)
        tile_second_index = tl.min(tl.where(v == tile_second[:, None], codes[None, :], _INT32_MAX), axis=1)
        tile_third = tl.min(tl.where(codes[None, :] == tile_second_index[:, None], float("inf"), v), axis=1)
        best, second, third, index, second_index = _merge(best, second, third, index, second_index, tile_best,
                                                          tile_second, tile_third, tile_index, tile_second_index)
    out = split * 3 * N + rows  # top_ptr: (splits, 3, N) values; top_index_ptr: (splits, 2, N)
    tl.store(top_ptr + out, best, mask=row_ok)
    tl.store(top_ptr + out + N, second, mask=row_ok)
    tl.store(top_ptr + out + N + N, third, mask=row_ok)  # N + N: 2 * N would be int32
    tl.store(top_index_ptr + split * 2 * N + rows, index, mask=row_ok)
    tl.store(top_index_ptr + split * 2 * N + N + rows, second_index, mask=row_ok)


@triton.jit
def _exact_sq_dist(x_ptr, cb_ptr, rows, row_ok, codes, code_ok, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 ||x_r - e_c||^2 for each (row, code) pair of the block, (BLOCK_N, BLOCK_K)."""
    dims = tl.arange(0, BLOCK_D)
    dist = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for d0 in range(0, D, BLOCK_D):  # a loop, not unrolled: unrolled loads spilled registers
        d_ok = (d0 + dims) < D
        xv = tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        ev = tl.load(cb_ptr + codes.to(tl.int64)[:, None] * D + d0 + dims[None, :],
                     mask=code_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        diff = xv[:, None, :] - ev[None, :, :]
        dist += tl.sum(diff * diff, axis=2)
    return dist


@triton.jit
def _row_sq_dist(x_ptr, cb_ptr, rows, mask, index, K, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """float32 ||x_r - e_index[r]||^2 for the rows of ``mask`` (0 elsewhere), (BLOCK_N,)."""
    dims = tl.arange(0, BLOCK_D)
    mask = mask & (index < K)
    dist = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        tile_mask = mask[:, None] & ((d0 + dims) < D)[None, :]
        xv = tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        ev = tl.load(cb_ptr + index.to(tl.int64)[:, None] * D + d0 + dims[None, :], mask=tile_mask,
                     other=0.0).to(tl.float32)
        dist += tl.sum((xv - ev) * (xv - ev), axis=1)
    return dist


@triton.jit
def _gather(x_ptr, cb_ptr, rows, row_ok, index, index_out_ptr, dist_out_ptr, quantized_ptr, loss_part_ptr, pid,
            D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_QUANTIZED: tl.constexpr):
    """Write the winners: index, exact squared distance, quantized row (a bit copy), and
    the block's distance sum."""
    dims = tl.arange(0, BLOCK_D)
    dist = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = row_ok[:, None] & ((d0 + dims) < D)[None, :]
        xv = tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        code = tl.load(cb_ptr + index.to(tl.int64)[:, None] * D + d0 + dims[None, :], mask=mask, other=0.0)
        diff = xv - code.to(tl.float32)
        dist += tl.sum(diff * diff, axis=1)
        if WRITE_QUANTIZED:
            tl.store(quantized_ptr + rows[:, None] * D + d0 + dims[None, :], code, mask=mask)
    tl.store(index_out_ptr + rows, index.to(tl.int64), mask=row_ok)
    tl.store(dist_out_ptr + rows, dist.to(dist_out_ptr.dtype.element_ty), mask=row_ok)
    tl.store(loss_part_ptr + pid, tl.sum(tl.where(row_ok, dist, 0.0), axis=0))


@triton.jit
def _resolve_kernel(x_ptr, cb_ptr, centre_ptr, top_ptr, top_index_ptr, scan_dist_ptr, scan_index_ptr,
                    index_out_ptr, dist_out_ptr, quantized_ptr, loss_part_ptr, cb_sq_max_ptr,
                    N, K, splits, codes_per_scan, rounding,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    CENTRE: tl.constexpr, GATHER: tl.constexpr, WRITE_QUANTIZED: tl.constexpr):
    """Makes the search exact (module docstring) for a row block and, in program ``scan``,
    the codes ``[scan * codes_per_scan, ...)``; with GATHER (one scan) writes the answer."""
    pid, scan = tl.program_id(0), tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.load(top_ptr + rows, mask=row_ok, other=0.0)
    second = tl.load(top_ptr + N + rows, mask=row_ok, other=float("inf"))
    third = tl.load(top_ptr + rows + N + N, mask=row_ok, other=float("inf"))
    index = tl.load(top_index_ptr + rows, mask=row_ok, other=0)
    second_index = tl.load(top_index_ptr + N + rows, mask=row_ok, other=0)
    for s in range(1, splits):  # splits cover increasing code ranges: ties stay with the earlier
        top, top_index = top_ptr + s * 3 * N + rows, top_index_ptr + s * 2 * N + rows
        best, second, third, index, second_index = _merge(
            best, second, third, index, second_index, tl.load(top, mask=row_ok, other=0.0),
            tl.load(top + N, mask=row_ok, other=float("inf")), tl.load(top + N + N, mask=row_ok, other=float("inf")),
            tl.load(top_index, mask=row_ok, other=0), tl.load(top_index + N, mask=row_ok, other=0))
    dims = tl.arange(0, BLOCK_D)
    x_sq = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dims) < D
        xv = tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        xv -= tl.load(centre_ptr + d0 + dims, mask=CENTRE & d_ok, other=0.0)[None, :]
        x_sq += tl.sum(tl.where(row_ok[:, None] & d_ok[None, :], xv * xv, 0.0), axis=1)
    max_sq_norm = tl.load(cb_sq_max_ptr)
    slack = 2.0 * rounding * (max_sq_norm + 2.0 * tl.sqrt(x_sq) * tl.sqrt(max_sq_norm))
    ambiguous = row_ok & ~((second - best) > slack)  # NaN-safe: a NaN gap or bound is ambiguous
    # Only the best and the second best are within the error bound: the exact distances of
    # these two candidates decide (program scan 0 alone; the others leave these rows).
    pair = ambiguous & ((third - best) > slack)
    if (scan == 0) & (tl.max(pair.to(tl.int32), axis=0) > 0):
        first_dist = _row_sq_dist(x_ptr, cb_ptr, rows, pair, index, K, D, BLOCK_N, BLOCK_D)
        second_dist = _row_sq_dist(x_ptr, cb_ptr, rows, pair, second_index, K, D, BLOCK_N, BLOCK_D)
        second_wins = (second_dist < first_dist) | ((second_dist == first_dist) & (second_index < index))
        index = tl.where(pair & second_wins, second_index, index)
    # Three or more codes within the bound (duplicates, large norms): the exact float32
    # distances over this program's codes, for the block if any of its rows needs them.
    rescan = ambiguous & ~((third - best) > slack)
    k_begin = scan * codes_per_scan
    k_end = tl.minimum(k_begin + codes_per_scan, K)
    scan_end = tl.where(tl.max(rescan.to(tl.int32), axis=0) > 0, k_end, k_begin)
    exact_best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    exact_index = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(k_begin, scan_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        dist = tl.where(code_ok[None, :], _exact_sq_dist(x_ptr, cb_ptr, rows, rescan, codes, code_ok, D, BLOCK_N,
                                                         BLOCK_K, BLOCK_D), float("inf"))
        dist = tl.where(dist != dist, -1.0, dist)  # distances are >= 0: -1 ranks a NaN first
        tile_best = tl.min(dist, axis=1)
        tile_index = tl.min(tl.where(dist == tile_best[:, None], codes[None, :], _INT32_MAX), axis=1)
        better = tile_best < exact_best
        exact_best = tl.where(better, tile_best, exact_best)
        exact_index = tl.where(better, tile_index, exact_index)
    if GATHER:
        _gather(x_ptr, cb_ptr, rows, row_ok, tl.where(rescan, exact_index, index), index_out_ptr, dist_out_ptr,
                quantized_ptr, loss_part_ptr, pid, D, BLOCK_N, BLOCK_D, WRITE_QUANTIZED)
    else:  # settled rows carry -1, below any distance: the merge keeps scan 0's answer
        tl.store(scan_dist_ptr + scan * N + rows, tl.where(rescan, exact_best, -1.0), mask=row_ok)
        tl.store(scan_index_ptr + scan * N + rows, tl.where(rescan, exact_index, index), mask=row_ok)


@triton.jit
def _gather_kernel(x_ptr, cb_ptr, scan_dist_ptr, scan_index_ptr, index_out_ptr, dist_out_ptr, quantized_ptr,
                   loss_part_ptr, N, scans, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   WRITE_QUANTIZED: tl.constexpr):
    """Merges the scans' answers in code order (ties to the lower index) and gathers."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.load(scan_dist_ptr + rows, mask=row_ok, other=0.0)
    index = tl.load(scan_index_ptr + rows, mask=row_ok, other=0)
    for s in range(1, scans):
        dist = tl.load(scan_dist_ptr + s * N + rows, mask=row_ok, other=0.0)
        better = dist < best
        best = tl.where(better, dist, best)
        index = tl.where(better, tl.load(scan_index_ptr + s * N + rows, mask=row_ok, other=0), index)
    _gather(x_ptr, cb_ptr, rows, row_ok, index, index_out_ptr, dist_out_ptr, quantized_ptr, loss_part_ptr, pid,
            D, BLOCK_N, BLOCK_D, WRITE_QUANTIZED)


@triton.jit
def _codebook_kernel(cb_ptr, centre_ptr, cb_sq_ptr, cb_sq_max_ptr, K, D: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, CENTRE: tl.constexpr):
    """||e - centre||^2 of each code, and their maximum (cb_sq_max_ptr starts at 0)."""
    codes = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    code_ok = codes < K
    dims = tl.arange(0, BLOCK_D)
    sq = tl.zeros((BLOCK_C,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dims) < D
        mask = code_ok[:, None] & d_ok[None, :]
        ev = tl.load(cb_ptr + codes[:, None] * D + d0 + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        ev -= tl.load(centre_ptr + d0 + dims, mask=CENTRE & d_ok, other=0.0)[None, :]
        sq += tl.sum(tl.where(mask, ev * ev, 0.0), axis=1)
    tl.store(cb_sq_ptr + codes, sq, mask=code_ok)
    # A NaN norm counts as inf in the maximum (atomic_max's NaN handling is the hardware's):
    # the bound is then inf and every row is rescanned exactly.
    tl.atomic_max(cb_sq_max_ptr, tl.max(tl.where(sq != sq, float("inf"), sq), axis=0))


def _config(x):
    """(BLOCK_N, BLOCK_K, BLOCK_D for the dot, BLOCK_D for the exact rescan, programs to aim
    for), by shape on a GPU within an H100's block (227 KiB shared memory, no spills: the
    sm_90 compile test compiles each branch)."""
    d = triton.next_power_of_2(max(x.shape[1], 16))
    if _launch.gpu_launch(x):
        programs = 2 * _launch.multiprocessors(x.device)
        if d <= 16:  # a sliver of a dot: the per-tile reductions dominate, so twice the rows share them
            return 128, 64, d, d, programs
        # 16-bit code tiles are half the bytes: twice the codes per tile in the same shared memory.
        block_k = 128 if x.dtype in (torch.float16, torch.bfloat16) and d <= 64 else 64
        # The exact rescan's (64 rows, 8 codes, 16 dims) difference tile is 64 registers a
        # thread at 4 warps; (64, 16, 32) spilled 5-15 KB a thread.
        return 64, block_k, min(d, 64), 16, programs
    # Interpreter: every program instance costs ~0.5 ms, so few large programs.
    return 64, 128, min(d, 256), min(d, 64), 4


def _search_options(block_n, block_k, d, on_gpu):
    """num_warps and num_stages of the search: 8 warps for a 128 x 64 tile (32 accumulator
    registers a thread), code tiles triple-buffered while D fits one 64-wide chunk (3
    stages of D = 256 took 288 KiB)."""
    if not on_gpu:
        return {}
    return {"num_warps": 8 if block_n * block_k >= 8192 else 4, "num_stages": 3 if d <= 64 else 2}


def _rounding(d, on_gpu, dot_16bit):
    """The coefficient of the expansion's error bound (module docstring: the truncating model)."""
    if not on_gpu:
        return (d + 4 + _CENTRING_ROUNDINGS) * _UNIT_ROUNDOFF
    if dot_16bit:
        return (2 * d + 4) * _UNIT_ROUNDOFF
    return (2 * d + 4 + _TF32X3_PRODUCT_ROUNDINGS + _CENTRING_ROUNDINGS) * _UNIT_ROUNDOFF


def _parts(k, block, parts):
    """(parts, codes per part): ``k`` codes cut into at most ``parts`` whole blocks."""
    per_part = triton.cdiv(triton.cdiv(k, max(1, min(triton.cdiv(k, block), parts))), block) * block
    return triton.cdiv(k, per_part), per_part


def _search(x, codebook, write_quantized):
    """Shared launcher: (indices, sq_dist in x's dtype, quantized or None, per-block loss sums)."""
    x, codebook = x.contiguous(), codebook.contiguous()
    n, d = x.shape
    k = codebook.shape[0]
    block_n, block_k, block_d, scan_block_d, target_programs = _config(x)
    on_gpu = _launch.gpu_launch(x)
    dot_16bit = on_gpu and x.dtype in (torch.float16, torch.bfloat16)
    precision = "tf32x3" if on_gpu and not dot_16bit else "ieee"  # 16-bit dots ignore it
    centre_codes = not dot_16bit  # centred 16-bit values would not be exact in 16 bits
    row_blocks = triton.cdiv(n, block_n)
    # The exact pass keeps 64-row blocks (its rescan tile is sized for them) whatever the search's.
    resolve_n = min(block_n, 64)
    resolve_blocks = triton.cdiv(n, resolve_n)
    indices = torch.empty(n, device=x.device, dtype=torch.int64)
    sq_dist = torch.empty(n, device=x.device, dtype=x.dtype)
    quantized = torch.empty_like(x) if write_quantized else sq_dist  # unused pointer when not written
    loss_parts = torch.empty(max(resolve_blocks, 1), device=x.device, dtype=torch.float32)
    if n == 0:
        return indices, sq_dist, (quantized if write_quantized else None), loss_parts.zero_()
    cb_sq = torch.empty(k, device=x.device, dtype=torch.float32)
    centre = codebook.mean(dim=0, dtype=torch.float32) if centre_codes else cb_sq  # unused when not centred
    cb_sq_max = torch.zeros(1, device=x.device, dtype=torch.float32)  # read by the kernels: no host sync
    _codebook_kernel[(triton.cdiv(k, 64),)](codebook, centre, cb_sq, cb_sq_max, k, D=d, BLOCK_C=64,
                                            BLOCK_D=scan_block_d, CENTRE=centre_codes)
    # Split the codes when there are too few row blocks to occupy the device.
    splits, codes_per_split = _parts(k, block_k, target_programs // row_blocks)
    top = torch.empty(splits, 3, n, device=x.device, dtype=torch.float32)
    top_index = torch.empty(splits, 2, n, device=x.device, dtype=torch.int32)
    _search_kernel[(row_blocks, splits)](x, codebook, centre, cb_sq, top, top_index, n, k, codes_per_split,
                                         D=d, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision,
                                         CENTRE=centre_codes, DOT_16BIT=dot_16bit,
                                         **_search_options(block_n, block_k, d, on_gpu))
    scan_block_k = 8 if on_gpu else block_k
    scans, codes_per_scan = _parts(k, scan_block_k, target_programs // resolve_blocks)
    scan_dist = torch.empty(scans, n, device=x.device, dtype=torch.float32) if scans > 1 else sq_dist
    scan_index = torch.empty(scans, n, device=x.device, dtype=torch.int32) if scans > 1 else indices
    _resolve_kernel[(resolve_blocks, scans)](
        x, codebook, centre, top, top_index, scan_dist, scan_index, indices, sq_dist, quantized, loss_parts, cb_sq_max,
        n, k, splits, codes_per_scan, _rounding(d, on_gpu, dot_16bit), D=d, BLOCK_N=resolve_n, BLOCK_K=scan_block_k,
        BLOCK_D=scan_block_d, CENTRE=centre_codes, GATHER=scans == 1, WRITE_QUANTIZED=write_quantized,
        num_warps=8 if on_gpu else 4)
    if scans > 1:
        _gather_kernel[(resolve_blocks,)](x, codebook, scan_dist, scan_index, indices, sq_dist, quantized, loss_parts,
                                          n, scans, D=d, BLOCK_N=resolve_n, BLOCK_D=scan_block_d,
                                          WRITE_QUANTIZED=write_quantized)
    return indices, sq_dist, (quantized if write_quantized else None), loss_parts


def nearest_code(x, codebook):
    indices, sq_dist, _, _ = _search(x, codebook, write_quantized=False)
    return indices, sq_dist


def vector_quantize(x, codebook, beta):
    indices, _, quantized, loss_parts = _search(x, codebook, write_quantized=True)
    loss = torch.empty((), device=x.device, dtype=x.dtype)
    # (1 + beta) * sum / numel in one launch (the Gaussian column's ordered sum)
    _sum_kernel[(1,)](loss_parts, loss, loss_parts.numel(), max(x.numel(), 1) / (1.0 + beta), SUM_BLOCK=SUM_BLOCK)
    return quantized, indices, loss
