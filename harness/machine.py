"""Facts about this machine that measurements depend on: the CPU (name, flags), the git commit, the
environment a run records in env.json, and which cases this machine cannot run at all.

torch-free at import: the parent asks these before any kernel is loaded.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from harness.errors import InputError
from harness.shapes import Case, Params
from harness.worker import allocator_settings


def git(*args: str, repo: str | Path | None = None, timeout: float = 120) -> str:
    """`git ARGS` in `repo` (default: this harness's own checkout); InputError with git's words if it fails."""
    cwd = repo if repo is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InputError(f"git {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise InputError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def _git_or_empty(*args: str) -> str:
    """For env.json: a harness installed outside a git checkout has no commit to say."""
    try:
        return git(*args, timeout=5)
    except InputError:
        return ""


def _cpuinfo() -> dict[str, str]:
    """The first CPU's entries of Linux's /proc/cpuinfo ({} where it cannot be read). Not cached: a read
    takes a millisecond, and compiled.* kernels reach it through the tile cache, where dynamo warns
    about a cached function."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`; empty where they cannot be read)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def environment(allocator: str = "fixed") -> dict:
    """What the numbers of a run depend on: versions, devices, threads, commit, the workers' allocator."""
    import torch

    import harness
    from harness.gpu import gpu_state

    env = {
        "harness_version": harness.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "gpu_state": gpu_state(),
        "git_commit": _git_or_empty("rev-parse", "HEAD"),
        "git_dirty": bool(_git_or_empty("status", "--porcelain", "--untracked-files=no")),
        "allocator": allocator_settings(allocator),
    }
    return env


# CPU flags that mean a native matmul in that dtype (x86 AVX512/AMX; Arm's bf16 and half-precision
# SIMD). Without them torch converts to float32 around every GEMM, several times slower than float32
# itself: a bfloat16 chunked attention at N=8192 ran past 300 s on an AVX2 EPYC.
NATIVE_MATMUL_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "fphp", "asimdhp"),
}
# Emulated cases above this much work are skipped (said so in the record), not left to time out.
EMULATED_MAX_FLOPS = 4e9


def emulated_dtype_reason(params: Params, flops: float) -> str:
    """Why a large half-precision CPU case is skipped on a CPU with no native matmul for it, or ''."""
    flags = NATIVE_MATMUL_FLAGS.get(params.dtype)
    if params.device != "cpu" or not flags or flops <= EMULATED_MAX_FLOPS:
        return ""
    have = cpu_flags()
    if not have or have & set(flags):
        return ""
    return (
        f"this CPU has no native {params.dtype} matmul ({' / '.join(flags[:2])}): torch emulates it several "
        f"times slower than float32, so cases over {EMULATED_MAX_FLOPS / 1e9:g} GFLOP are skipped"
    )


def skip_reason(case: Case) -> str:
    """Why a case cannot run on this machine at all (excluded, no such device, emulated dtype), or ''.

    Whether the implementation has a kernel for the case's dtype is the worker's to say.
    """
    if case.skip_reason:
        return case.skip_reason
    if not case.task:
        from harness.variants import get_variant

        why = emulated_dtype_reason(case.params, get_variant(case.variant).flops(case.params))
        if why:
            return why
    device = case.params.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device on this machine"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"{device} does not exist (this machine has {torch.cuda.device_count()} CUDA devices)"
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            return "no MPS device on this machine"
    return ""
