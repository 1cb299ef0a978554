"""Compile recorded Triton launches for sm_90 (used by test_triton_gpu_compile.py).

    python tests/triton_sm90_compile.py launches.json

Each launch comes specialised as Triton's JIT would specialise it on a GPU (integers equal
to 1 become constants, integers and pointers divisible by 16 carry ``tt.divisibility``),
and is compiled to a cubin, and checked against the H100/H200's per-block limits: at most
227 KiB of shared memory and no register spills (ptxas's own report)."""
import contextlib
import importlib
import io
import json
import re
import sys
import time

import triton
from triton import knobs
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64",
                 "int64": "*i64", "int32": "*i32", "int8": "*i8", "uint8": "*u8", "bool": "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
MAX_SHARED_BYTES = 227 * 1024  # sm_90: the most one block can opt in to


def _kernel(module, name):
    kernel = getattr(importlib.import_module(module), name)
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap autotune/heuristics
        kernel = kernel.fn
    return kernel


def _specialise(param, arg):
    """(signature type, constexpr value or None, attribute key), as the JIT derived them
    (test_triton_gpu_compile records them)."""
    if "tensor" in arg:
        return POINTER_TYPES[arg["tensor"]], None, "D" if arg["aligned"] else ""
    if "kind" in arg:  # a runtime scalar, specialised when recorded
        return arg["kind"], arg["value"], arg["key"]
    return "constexpr", arg["value"], None


def compile_launch(launch, target):
    """Compile one launch; return (shared bytes, spill bytes, registers)."""
    kernel = _kernel(launch["module"], launch["name"])
    given = dict(zip((p.name for p in kernel.params), launch["args"]))
    given.update({k: v for k, v in launch["kwargs"].items() if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        if param.name not in given:
            if param.is_constexpr:
                constexprs[param.name] = param.default
                signature[param.name] = "constexpr"
            continue
        kind, constant, key = _specialise(param, given[param.name])
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = constant
        elif key:
            attrs[(index,)] = BaseBackend.parse_attr(key)
    options = {k: v["value"] for k, v in launch["kwargs"].items() if k in LAUNCH_OPTIONS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
        knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
        compiled = triton.compile(source, target=target, options=options)
    assert compiled.asm.get("cubin"), "no cubin"
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue()))
    registers = max((int(n) for n in re.findall(r"Used (\d+) registers", log.getvalue())), default=0)
    return compiled.metadata.shared, spills, registers


def main():
    launches = json.load(open(sys.argv[1]))
    target = GPUTarget("cuda", 90, 32)
    failures = []
    for launch in launches:
        label = f"{launch['module']}.{launch['name']} {launch['kwargs']}"
        start = time.perf_counter()
        try:
            shared, spills, registers = compile_launch(launch, target)
        except Exception as exc:  # report every failing kernel, not just the first
            failures.append(f"{label}: {type(exc).__name__}: {exc}"[:3000])
            continue
        print(f"{label}: shared {shared} B, {registers} registers, spills {spills} B "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        if shared > MAX_SHARED_BYTES:
            failures.append(f"{label}: {shared} bytes of shared memory > {MAX_SHARED_BYTES}")
        if spills:
            failures.append(f"{label}: {spills} bytes of register spills")
    for failure in failures:
        print("FAILED", failure)
    if failures:
        sys.exit(1)
    print(f"compiled {len(launches)} launches for sm_90")


if __name__ == "__main__":
    main()
