"""What every op file shares: the custom-op library, autograd plumbing, argument checks
and seed drawing."""
import math
import numbers

import numpy as np
import torch
from torch.autograd import forward_ad
from torch.utils._pytree import tree_map

from .. import _backend

LIB = torch.library.Library("fastvae", "DEF")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
_SEED_BOUND = 2**63 - 1
functorch_active = torch._C._are_functorch_transforms_active
is_compiling, dispatch_modes = torch.compiler.is_compiling, torch._C._len_torch_dispatch_stack


def define(schema, fake, formula=None):
    """Define ``fastvae::<name>`` from ``schema``; return the function that calls it.

    The op is registered as CompositeExplicitAutograd (every device key) with a fake
    implementation, so ``torch.compile``/``torch.export``/fake tensors treat it as one
    opaque node; autograd comes from the caller's ``torch.autograd.Function``. In plain
    eager calls the returned function skips the dispatcher round trip (about 5 us) and
    calls the chosen backend directly: same implementation, same result. Under
    ``torch.func.vmap`` the op runs once per sample (see :func:`_vmap_per_sample`).

    ``formula`` (backward ops) is the same computation in differentiable PyTorch (the
    reference's): called with grad mode on, which in a backward means
    ``create_graph=True``, the op runs it instead of the kernel, so autograd records the
    graph and second derivatives are exact. Kernels record nothing, so leaving them there
    would silently drop the op's terms from the second derivative.
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    lookup = _backend.lookup

    def run(first, *rest):
        return lookup(name, first)(first, *rest)

    LIB.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastvae::{name}", fake, lib=LIB)
    op = getattr(torch.ops.fastvae, name).default
    torch.library.register_vmap(op, _vmap_per_sample(op), lib=LIB)
    grad_enabled = torch.is_grad_enabled

    def call(first, *rest):
        if formula is not None and grad_enabled():
            return formula(first, *rest)
        if not is_compiling() and type(first) is torch.Tensor and not dispatch_modes() and not functorch_active():
            return lookup(name, first)(first, *rest)
        return op(first, *rest)

    call.__name__ = call.__qualname__ = name
    return call


def _vmap_per_sample(op):
    """A ``torch.func.vmap`` rule that runs ``op`` on each sample and stacks the results.

    The kernels need plain tensors, and the ops mix batched and unbatched arguments.
    The seed of a random op is an argument like any other: drawn once under
    ``vmap(..., randomness="same")`` (every sample gets the same noise, as the one call
    on that sample would), once per sample under ``"different"``; under the default
    ``"error"`` drawing it raises, as any random PyTorch op does.
    """
    def rule(info, in_dims, *args):
        samples = [op(*[arg if dim is None else arg.select(dim, b) for arg, dim in zip(args, in_dims)])
                   for b in range(info.batch_size)]
        stacked = tree_map(lambda *per_sample: torch.stack(per_sample), *samples)
        return stacked, tree_map(lambda _: 0, stacked)

    return rule


class OpFunction(torch.autograd.Function):
    """Base of the ops' autograd Functions.

    Subclasses are ``setup_context``-style (``forward`` without ``ctx``) and have a
    generated vmap rule, which ``torch.func`` transforms need; call them through
    :func:`apply`. Their backward ops switch to differentiable formulas under
    ``create_graph=True`` (see :func:`define`). Forward-mode AD is not implemented: it
    raises PyTorch's "You must implement the jvp function" (a ``jvp`` staticmethod,
    even one raising a clearer error, would stop Dynamo from tracing the Function).
    """
    generate_vmap_rule = True


def needs_autograd(*tensors):
    """Whether an op must run through its :class:`OpFunction`: some input requires grad
    (grad mode on), or a ``torch.func`` transform or a forward-mode dual level is active.
    The bare kernels have no derivatives at all and would silently give none."""
    if functorch_active() or forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apply(function, *args):
    """``function.apply(*args)`` for an :class:`OpFunction`.

    For a ``setup_context``-style Function, ``Function.apply`` binds the arguments
    through ``inspect.signature`` first: about 9 us a call, doubling small ops'
    overhead, with no defaults to bind. Outside transforms and compilation this calls
    the C++ apply that ``Function.apply`` ends in directly.
    """
    if functorch_active() or torch.compiler.is_compiling():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# The backend choices under which a CPU call runs the native kernel when the extension is
# there (for a dtype it takes, which the entry points check).
_NATIVE_ON_CPU = frozenset({"native"} | ({"auto"} if _backend._PREFERENCE["cpu"][0] == "native" else set()))
# op name -> its C++ entry point (fastvae._native.eager_<op>), taken from the native backend
# object _eager_entries_source; filled on first use and again if that object is replaced.
_eager_entries, _eager_entries_source = {}, None


def native_eager(op, first):
    """The native extension's C++ entry point for ``op`` (csrc/eager.cpp) when this call
    may take it, else None.

    It may when the call is plain eager (no compilation or forward-mode AD here; the entry
    point checks for dispatch and function modes and ``torch.func`` transforms) and the
    backend in force runs CPU calls on the native kernels. The entry point screens the
    arguments (CPU tensors of a kernel dtype, valid values), draws the seed and records
    autograd in C++, and returns None for a call it does not take, which then runs the
    Python path: same results, same random stream, same errors. (Not ``_backend.lookup``:
    its key costs a microsecond a call.)
    """
    global _eager_entries, _eager_entries_source
    # is_compiling first: Dynamo tracing this function stops there (it cannot trace a ContextVar).
    if (is_compiling() or type(first) not in _PLAIN_TENSORS or _backend.get_backend() not in _NATIVE_ON_CPU
            or forward_ad._current_level >= 0):
        return None
    backend = _backend._BACKENDS["native"]
    if _eager_entries_source is not backend:
        native = backend.module()
        _eager_entries, _eager_entries_source = {} if native is None else {
            name[len("eager_"):]: getattr(native, name) for name in dir(native) if name.startswith("eager_")}, backend
    return _eager_entries.get(op)


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


def check_real(name, value, *, minimum, inclusive=True):
    """``value`` as a float: a real number as PyTorch takes one (a Python or NumPy scalar,
    not a bool), finite, and ``>= minimum`` (``> minimum`` when not ``inclusive``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a default argument
    # such as beta=0.25 is traced as a symbolic float, which math.isfinite cannot take.
    if not -math.inf < value < math.inf or value < minimum or (value == minimum and not inclusive):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {minimum}, got {value}")
    return value


def check_flag(name, value):
    """``value`` as a bool: a bool, NumPy bool or int (what ``if value:`` takes in PyTorch's own
    functional flags), never a string or a tensor."""
    if not isinstance(value, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_reduction(reduction, choices=REDUCTIONS):
    if reduction not in choices:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, choices))}, got {reduction!r}")


def check_dim(name, dim, ndim):
    """``dim`` (a Python or NumPy int, as PyTorch takes one) as an index in ``[0, ndim)``."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    dim = int(dim)
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % ndim


def check_size(name, value):
    """``value`` as an int >= 1: a count such as a number of codes (a Python or NumPy int)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


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
