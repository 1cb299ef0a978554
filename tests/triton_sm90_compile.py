"""Compile recorded Triton launches for sm_90 (used by test_triton_gpu_compile.py).

    python tests/triton_sm90_compile.py launches.json
"""
import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64",
                 "int64": "*i64", "int32": "*i32", "int8": "*i8", "uint8": "*u8", "bool": "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _scalar_type(value):
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def _kernel(module, name):
    kernel = getattr(importlib.import_module(module), name)
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap autotune/heuristics
        kernel = kernel.fn
    return kernel


def compile_launch(launch, target):
    kernel = _kernel(launch["module"], launch["name"])
    given = dict(zip((p.name for p in kernel.params), launch["args"]))
    given.update({k: v for k, v in launch["kwargs"].items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in kernel.params:
        if param.name not in given:
            if param.is_constexpr:
                constexprs[param.name] = param.default
                signature[param.name] = "constexpr"
            continue
        arg = given[param.name]
        if "tensor" in arg:
            signature[param.name] = POINTER_TYPES[arg["tensor"]]
        elif param.is_constexpr or arg["value"] is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = arg["value"]
        else:
            signature[param.name] = _scalar_type(arg["value"])
    options = {k: v["value"] for k, v in launch["kwargs"].items() if k in LAUNCH_OPTIONS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=target, options=options)
    assert compiled.asm.get("cubin"), f"{launch['name']}: no cubin"


def main():
    launches = json.load(open(sys.argv[1]))
    target = GPUTarget("cuda", 90, 32)
    failures = []
    for launch in launches:
        try:
            compile_launch(launch, target)
        except Exception as exc:  # report every failing kernel, not just the first
            failures.append(f"{launch['module']}.{launch['name']}: {type(exc).__name__}: {exc}"[:3000])
    for failure in failures:
        print("FAILED", failure)
    if failures:
        sys.exit(1)
    print(f"compiled {len(launches)} launches for sm_90")


if __name__ == "__main__":
    main()
