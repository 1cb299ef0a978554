"""Backend registry and selection.

A backend is a module that provides some of the op functions of ``fastvae.reference``
(same names, same signatures). It joins by one ``_register`` call below; no op needs
editing. For each call, ``lookup(op, tensor)`` picks the implementation:

* an explicit backend (``use_backend("native")``) runs the op or raises
  :class:`BackendError` saying why it cannot (not installed, wrong device, op missing,
  no kernel for the op on that device);
* ``auto`` takes the first backend in the device's preference order that can run it,
  so an op a backend lacks simply falls through to the next. On CUDA, an op that the
  native extension has a CUDA kernel for runs there when its tensors are small (fewer
  than ``SMALL_CUDA_NUMEL`` elements): one C++ launch costs a few microseconds, a Triton
  launch's Python side tens, which dwarfs a small kernel.

A backend registered with ``device_guard`` (Triton: its launches go to the *current*
CUDA device and that device's current stream) runs each CUDA call with the first
tensor's device made current, so a tensor on ``cuda:1`` never launches on GPU 0.

Choices are cached per (backend, op, device type, dtype): the hot path is one dict
lookup after the first call.
"""
import contextlib
import contextvars
import importlib
import os

import torch

# The backend interface: the functions of fastvae.reference a backend may provide.
OPS = (
    "reparameterize", "reparameterize_backward", "gaussian_kl", "gaussian_kl_backward",
    "reparameterize_kl", "reparameterize_kl_backward",
    "gumbel_softmax", "gumbel_softmax_backward", "gumbel_softmax_backward_from_sample",
    "categorical_kl", "categorical_kl_backward", "gumbel_quantize", "gumbel_quantize_backward",
    "gumbel_quantize_kl", "gumbel_quantize_kl_backward",
    "nearest_code", "vector_quantize", "vector_quantize_backward", "vector_quantize_rotation_backward",
    "residual_quantize", "residual_quantize_backward", "residual_segment_sums", "segment_mean",
)
KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
ALL_DTYPES = KERNEL_DTYPES | {torch.float64}


class BackendError(RuntimeError):
    """A backend was asked for something it cannot do here."""


class _Backend:
    def __init__(self, name, module, devices, dtypes, unavailable_hint, device_ops=None, device_guard=False):
        self.name = name
        self.device_guard = device_guard
        self._module_name = module
        self._devices = devices  # () -> set of device types it can run
        # () -> {device type: the ops with a kernel there}; a device type left out runs every op
        self._device_ops = device_ops
        self.dtypes = dtypes
        self._hint = unavailable_hint
        self._loaded = None
        self.load_error = None

    def module(self):
        if self._loaded is None and self.load_error is None:
            try:
                self._loaded = importlib.import_module(self._module_name)
            except ImportError as exc:  # optional dependency or extension missing
                self.load_error = exc
        return self._loaded

    def devices(self):
        return self._devices() if self.module() is not None else set()

    def implements(self, op):
        module = self.module()
        return module is not None and callable(getattr(module, op, None))

    def has_kernel(self, op, device_type):
        """Whether ``op`` has a kernel for ``device_type`` (given the device is one it runs)."""
        ops = self._device_ops().get(device_type) if self._device_ops is not None else None
        return ops is None or op in ops

    def why_not(self, op, device_type, dtype):
        """None if this backend runs ``op`` on (device_type, dtype), else the reason."""
        if self.module() is None:
            return f"it is not available ({self._hint}: {self.load_error})"
        if device_type not in self.devices():
            return f"it cannot run {device_type} tensors here (it runs: {sorted(self.devices()) or 'nothing'})"
        if dtype not in self.dtypes:
            return f"it does not take {dtype} inputs (use 'torch' or 'auto' for those)"
        if not self.implements(op):
            return f"it does not implement '{op}' yet"
        if not self.has_kernel(op, device_type):
            return f"it has no {device_type.upper()} kernel for {op}"
        return None


def _triton_devices():
    devices = set()
    if torch.cuda.is_available():
        devices.add("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.add("cpu")
    return devices


def _native_devices():
    return set(importlib.import_module("fastvae._native").devices())


def _native_device_ops():
    # A CUDA build has CUDA kernels for some ops only; its CPU kernels cover every op.
    return {"cuda": frozenset(importlib.import_module("fastvae._native").cuda_ops())}


_BACKENDS = {}
# Fastest first, per device type; `auto` walks this list.
_PREFERENCE = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
_FALLBACK_PREFERENCE = ("torch",)
# On CUDA, `auto` runs an op on the native CUDA kernel, where there is one, below this
# many elements of the op's work tensor, and on Triton from there on. A guess, to be
# measured on a GPU (benchmarks/bench_overhead.py --device cuda): a Gaussian kernel moves
# ~16 bytes an element, so at 2^20 elements it runs ~6 us at 3 TB/s, well under a Triton
# launch's ~20-40 us of Python, which only larger kernels hide behind the GPU's queue.
SMALL_CUDA_NUMEL = 1 << 20
_SMALL_PREFERENCE = {"cuda": ("native",)}
# The argument whose size measures an op's work: the first, except where that may be a
# reduced scalar (the gradient of a reduced KL).
_WORK_ARGUMENT = {"gaussian_kl_backward": 1}


def _register(name, module, devices, dtypes, hint, device_ops=None, device_guard=False):
    _BACKENDS[name] = _Backend(name, module, devices, dtypes, hint, device_ops, device_guard)


_register("triton", "fastvae.kernels", _triton_devices, KERNEL_DTYPES,
          "needs the triton package, and TRITON_INTERPRET=1 for CPU tensors", device_guard=True)
_register("native", "fastvae._native", _native_devices, KERNEL_DTYPES,
          "the compiled extension fastvae._C_<level> was not built or does not load; reinstall with a C++ compiler",
          _native_device_ops)
_register("torch", "fastvae.reference", lambda: {"cpu", "cuda", "mps", "xpu", "meta"}, ALL_DTYPES, "")

NAMES = ("auto",) + tuple(_BACKENDS)
# Not checked here: an unknown name must not break `import fastvae` (nor `python -m
# fastvae`, which reports it); each op call raises (_resolve), naming the variable.
_global_choice = os.environ.get("FASTVAE_BACKEND", "auto")
_scoped_choice = contextvars.ContextVar("fastvae_backend", default=None)
_cache = {}


def _check_name(name, origin=""):
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}, got {name!r}{origin}")
    return name


def available_backends():
    """Names of the backends that run ops on this machine (``auto`` always)."""
    return ["auto"] + [name for name, b in _BACKENDS.items() if b.devices() and _implements_any(b)]


def _implements_any(backend):
    return any(backend.implements(op) for op in OPS)


def get_backend():
    """The backend name in force here (``use_backend`` scope, else the global one)."""
    return _scoped_choice.get() or _global_choice


def set_backend(name):
    """Choose the backend globally (``auto``, ``triton``, ``native`` or ``torch``)."""
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager choosing the backend for the ops called inside it."""
    token = _scoped_choice.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def lookup(op, tensor):
    """The implementation of ``op`` for ``tensor``'s device and dtype (cached)."""
    choice = _scoped_choice.get() or _global_choice
    key = (choice, op, tensor.device.type, tensor.dtype)
    impl = _cache.get(key)
    if impl is None:
        impl = _cache[key] = _resolve(*key)
    return impl


def _on_tensor_device(impl):
    """``impl`` called with its first tensor's CUDA device current (and so that device's
    current stream): the guard of every call of a ``device_guard`` backend on CUDA."""
    device = torch.cuda.device

    def guarded(first, *rest):
        with device(first.device):
            return impl(first, *rest)

    guarded.__name__ = guarded.__qualname__ = impl.__name__
    return guarded


def _implementation(backend, op, device_type):
    if device_type == "meta":
        # Meta tensors have shapes and no values: the op's registered fake (its Meta kernel)
        # gives the outputs. The reference would run value-dependent steps on them (the VQ
        # search's exactness check calls nonzero, which meta tensors cannot answer).
        return getattr(torch.ops.fastvae, op).default
    impl = getattr(backend.module(), op)
    return _on_tensor_device(impl) if backend.device_guard and device_type == "cuda" else impl


def _resolve(choice, op, device_type, dtype):
    if choice != "auto":
        # set_backend and use_backend check their names: an unknown one here came from the environment.
        _check_name(choice, origin=" (from the environment variable FASTVAE_BACKEND)")
        reason = _BACKENDS[choice].why_not(op, device_type, dtype)
        if reason is not None:
            raise BackendError(f"fastvae backend '{choice}' cannot run {op} on {device_type} {dtype}: {reason}")
        return _implementation(_BACKENDS[choice], op, device_type)
    large = _first_able(_PREFERENCE.get(device_type, _FALLBACK_PREFERENCE), op, device_type, dtype)
    if large is None:
        raise BackendError(f"no fastvae backend can run {op} on {device_type} {dtype}")
    small = _first_able(_SMALL_PREFERENCE.get(device_type, ()), op, device_type, dtype)
    if small is None or small is large:
        return _implementation(large, op, device_type)
    return _by_size(_implementation(small, op, device_type), _implementation(large, op, device_type),
                    _WORK_ARGUMENT.get(op, 0))


def _first_able(names, op, device_type, dtype):
    """The first backend of ``names`` that runs ``op`` on (device_type, dtype), or None."""
    return next((_BACKENDS[name] for name in names if _BACKENDS[name].why_not(op, device_type, dtype) is None), None)


def _by_size(small, large, work_argument):
    """``small`` for calls whose work tensor has fewer than ``SMALL_CUDA_NUMEL`` elements,
    else ``large`` (cached like any implementation: one size test a call)."""
    def chosen(*args):
        return (small if args[work_argument].numel() < SMALL_CUDA_NUMEL else large)(*args)

    chosen.__name__ = chosen.__qualname__ = large.__name__
    return chosen


def implementations(name):
    """The backend-interface functions (of ``OPS``) that backend ``name`` provides."""
    return [op for op in OPS if _BACKENDS[_check_name(name)].implements(op)]
