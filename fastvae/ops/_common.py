"""What every op file shares: the custom-op library, argument checks and seed drawing."""
import torch

from .. import _backend

LIB = torch.library.Library("fastvae", "DEF")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
_SEED_BOUND = 2**63 - 1


def define(schema, fake):
    """Define ``fastvae::<name>`` from ``schema``; return the function that calls it.

    The op is registered as CompositeExplicitAutograd (every device key) with a fake
    implementation, so ``torch.compile``/``torch.export``/fake tensors treat it as one
    opaque node; autograd comes from the caller's ``torch.autograd.Function``. In plain
    eager calls the returned function skips the dispatcher round trip (about 5 us) and
    calls the chosen backend directly: same implementation, same result.
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    lookup = _backend.lookup

    def run(first, *rest):
        return lookup(name, first)(first, *rest)

    LIB.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastvae::{name}", fake, lib=LIB)
    op = getattr(torch.ops.fastvae, name).default
    is_compiling, dispatch_modes = torch.compiler.is_compiling, torch._C._len_torch_dispatch_stack

    def call(first, *rest):
        if not is_compiling() and type(first) is torch.Tensor and not dispatch_modes():
            return lookup(name, first)(first, *rest)
        return op(first, *rest)

    call.__name__ = call.__qualname__ = name
    return call


def check_float(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _backend.ALL_DTYPES:
        raise TypeError(f"{name} must be a float32, float16, bfloat16 or float64 tensor, got {tensor.dtype}")


def check_like(name, tensor, ref_name, ref):
    """``tensor`` is a float tensor on ``ref``'s device with ``ref``'s dtype."""
    check_float(name, tensor)
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has {ref.dtype}; pass both in one dtype")


def check_reduction(reduction, choices=REDUCTIONS):
    if reduction not in choices:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, choices))}, got {reduction!r}")


def check_dim(name, dim, ndim):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % ndim


def draw_seed(device, generator):
    """A fresh 63-bit seed in a one-element int64 tensor on ``device``.

    Kernels read it from memory (never as a launch constant), which keeps it out of
    Triton's integer specialisation and valid under CUDA-graph capture.
    """
    if generator is None:
        return torch.randint(_SEED_BOUND, (1,), device=device, dtype=torch.int64)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    seed = torch.randint(_SEED_BOUND, (1,), device=generator.device, dtype=torch.int64, generator=generator)
    return seed.to(device)
