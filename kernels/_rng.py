"""The counter-based random streams of fastvae/reference.py, in Triton.

Bit for bit the streams of csrc/philox.h: Philox-4x32-10 keyed by the 64-bit seed, draws
mapped to uniforms in [2**-24, 1 - 2**-24] that are exact in float32.
"""
import triton
import triton.language as tl


@triton.jit
def uint_to_uniform(r):
    return (r >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.960464477539063e-08


@triton.jit
def normal4(seed, group):
    """Four N(0, 1) blocks for the Gaussian stream's groups ``group`` (int64 block)."""
    lo = group.to(tl.uint32)
    hi = (group >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    rad01 = tl.sqrt(-2.0 * tl.log(uint_to_uniform(r0)))
    rad23 = tl.sqrt(-2.0 * tl.log(uint_to_uniform(r2)))
    th01 = 6.283185307179586 * uint_to_uniform(r1)
    th23 = 6.283185307179586 * uint_to_uniform(r3)
    return rad01 * tl.cos(th01), rad01 * tl.sin(th01), rad23 * tl.cos(th23), rad23 * tl.sin(th23)


@triton.jit
def gumbel4(seed, row, quad):
    """Four Gumbel(0, 1) blocks: columns 4*quad + lane of ``row`` (blocks broadcast)."""
    row = row.to(tl.int64)
    quad = quad.to(tl.uint32)
    row_lo = row.to(tl.uint32)
    # `+ zero` broadcasts row and column counters to the block's shape
    c0 = quad + row_lo * 0
    c1 = row_lo + quad * 0
    c2 = (row >> 32).to(tl.uint32) + quad * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c0 * 0)
    return (-tl.log(-tl.log(uint_to_uniform(r0))), -tl.log(-tl.log(uint_to_uniform(r1))),
            -tl.log(-tl.log(uint_to_uniform(r2))), -tl.log(-tl.log(uint_to_uniform(r3))))
