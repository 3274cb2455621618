"""Compile the `triton` implementation's kernels for NVIDIA GPUs without a GPU (ahead of time, to cubin).

Triton ships ptxas, so its whole pipeline (Triton IR, TritonGPU IR, LLVM, PTX, cubin) runs on any
machine. This catches what the interpreter cannot: code the GPU compiler rejects, tiles that do not
fit in shared memory, register spills. It does not run anything, so it says nothing about speed or
results: those need a GPU (tools/gpu_check.py).

    python tools/triton_compile_check.py [--arch 90 80] [--head-dim 64 128] [--dtype ...] [--configs N]

Prints one row per kernel, dtype, head_dim, causality and tile config: the shared memory it needs
(a config over the GPU's limit is one the autotuner drops at run time) or the compiler's error.
Exit 1 when any compile fails, or when every config of a kernel, dtype and head_dim is over the
limit (the autotuner would have nothing left), 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# Shared memory a thread block may use, KiB, by compute capability (CUDA programming guide).
SMEM_LIMIT_KIB = {80: 163, 86: 99, 89: 99, 90: 227}


def _signature(fn, pointer: str, constexprs: dict) -> dict[str, str]:
    """Every argument's type for triton.compile: pointers by name, scales float, the rest int32."""
    floats = {"qk_scale", "scale", "CAP"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA", "SLOPES"):
            signature[name] = "*fp32"
        elif name in ("DOC", "START", "END", "CACHE_LENS", "BLOCK_TABLE"):
            signature[name] = "*i32"
        elif name in floats:
            signature[name] = "fp32"
        elif (
            name.isupper()
            and name not in ("H", "GROUP", "N_Q", "N_KV", "HEAD_DIM", "OFFSET", "W", "PAGE", "MAX_PAGES")
            and not name.endswith("_CLASS")
        ):
            signature[name] = f"*{pointer}"
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--configs", type=int, default=None, help="only the first N tile configs of each kernel")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the real JIT functions, not the interpreter's

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from implementations.triton_flash import kernels

    failures = 0
    print(f"{'kernel':12s} {'arch':>4s} {'dtype':9s} {'D':>4s} {'causal':10s} {'tile':8s} {'warps':>5s} {'stages':>6s}"
          f" {'smem KiB':>8s}")  # fmt: skip
    jobs = [
        ("forward", kernels._forward_kernel, kernels._configs()[: args.configs]),
        ("backward_kv", kernels._backward_kv_kernel, kernels._configs(backward=True)[: args.configs]),
        ("backward_q", kernels._backward_q_kernel, kernels._configs(backward=True)[: args.configs]),
    ]
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, configs in jobs:
            for dtype in args.dtype:
                for head_dim in args.head_dim:
                    fitting = 0
                    # Plain, then with every modifier (window, softcap, ALiBi, documents; forward: a paged
                    # ragged cache too) compiled in: the constexpr branches a plain compile never sees.
                    flags = [name for name in fn.arg_names if name.startswith("HAS_")]
                    for causal, modified in ((False, False), (True, False), (True, True)):
                        for config in configs:
                            constexprs = {
                                "CAUSAL": causal,
                                "BLOCK_D": triton.next_power_of_2(head_dim),
                                "UPCAST": False,
                                "PRECISION": "ieee" if dtype == "float32" else "tf32",
                                **dict.fromkeys(flags, modified),
                                **config.kwargs,
                            }
                            source = ASTSource(fn, _signature(fn, TYPES[dtype], constexprs), constexprs)
                            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                            tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                            what = f"{causal!s}{'+mods' if modified else ''}"
                            row = f"{name:12s} {arch:4d} {dtype:9s} {head_dim:4d} {what:10s} {tile:8s}"
                            row += f" {config.num_warps:5d} {config.num_stages:6d}"
                            try:
                                compiled = triton.compile(source, target=target, options=options)
                            except Exception as exc:  # the compiler's own words are the row
                                failures += 1
                                print(f"{row}  FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                                continue
                            smem = compiled.metadata.shared / 1024
                            limit = SMEM_LIMIT_KIB.get(arch)
                            over = limit is not None and smem > limit
                            fitting += not over
                            print(f"{row} {smem:8.1f}" + ("  over the limit: dropped by the autotuner" if over else ""))
                    if not fitting:
                        failures += 1
                        print(f"{name} {arch} {dtype} D={head_dim}: no config fits in shared memory")
    print(f"\n{failures} failed" if failures else "\nall compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
