"""One case → one worker request → its records: the measuring layer, and the only place a case is prepared.

The parent side (`request_for`, `records_of`, `measure_cases`) turns cases into typed requests,
hands them to a `harness.worker.Worker` and the replies into records. The worker side (`handle`)
runs in the spawned process: it prepares the case (inputs built and checked once, outside any timed
region), judges accuracy against the float64 reference, then measures peak memory and time.
`prepare` is also what `profile`, the asv benchmarks and the pytest-benchmark kernels use, so all
four measure the same call.

torch is imported inside the functions that need it: the parent validates and schedules without it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.errors import first_line
from harness.results import TASK_CACHE, Outcome, Record, Status, new_record
from harness.shapes import Case, Params
from harness.suite.schema import Limits, Timing
from harness.worker import LEAK_LIMIT_BYTES, Worker, settled_rss

if TYPE_CHECKING:
    import torch

    from harness.registry import Implementation
    from harness.suite.schema import Suite
    from harness.variants import Inputs


OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


# ----------------------------------------------------------------------------- requests and replies


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CaseRequest(_Message):
    """Measure one kernel case in the worker."""

    kind: Literal["case"] = "case"
    variant: str
    implementation: str
    params: dict[str, Any]
    measure: list[str] = Field(default_factory=lambda: ["time", "memory", "accuracy"])
    timing: Timing = Timing()
    seed: int = 0
    # The gate pins both sides of a round to the same cores and asks for new allocations per round.
    cpus: list[int] = Field(default_factory=list)
    fresh_inputs: bool = False


class TaskRequest(_Message):
    """Evaluate one implementation on an application task (harness.tasks)."""

    kind: Literal["task"] = "task"
    task: str
    variant: str
    implementation: str
    cache_dir: str = str(TASK_CACHE)
    threads: int | None = None


class NamesRequest(_Message):
    """The implementations registered in the worker's source tree, per variant."""

    kind: Literal["names"] = "names"


Request = CaseRequest | TaskRequest | NamesRequest


# ----------------------------------------------------------------------------- preparing a case


@dataclass
class Prepared:
    """A case ready to call: the implementation, inputs (already checked) and the work one call does."""

    impl: Implementation
    inputs: Inputs
    params: Params
    flops: float
    tokens: int
    bytes_moved: float
    dout: torch.Tensor | None = None  # the gradient a backward pass starts from (seeded like the inputs)

    def call(self) -> torch.Tensor:
        return self.inputs.call(self.impl.fn)

    def clear_grads(self) -> None:
        for leaf in self.inputs.grad_leaves().values():
            leaf.grad = None

    def grads(self) -> dict[str, torch.Tensor | None]:
        return {name: leaf.grad for name, leaf in self.inputs.grad_leaves().items()}

    def step(self) -> Callable[[], object]:
        """What one timed call of this case's direction runs.

        `fwd`: the kernel. `fwd_bwd`: the kernel, then `out.backward(dout)`. `bwd`: one untimed
        forward here, then every timed call is `out.backward(dout, retain_graph=True)` on its graph:
        the backward alone, as flash-attention's benchmark times it. A fresh forward per sample would
        need the clock stopped around each forward (and on CUDA a synchronisation per sample); the
        retained graph keeps exactly what training keeps between forward and backward.
        """
        if self.params.direction == "fwd":
            return self.call
        if self.params.direction == "fwd_bwd":

            def forward_backward() -> None:
                self.clear_grads()
                self.call().backward(self.dout)

            return forward_backward
        out = self.call()

        def backward() -> None:
            self.clear_grads()
            out.backward(self.dout, retain_graph=True)

        return backward


def prepare(variant: str, implementation: str, params: Params, seed: int = 0, inputs: Inputs | None = None) -> Prepared:
    """Build (or reuse) the case's inputs and check them once against the kernel contract.

    Availability is the caller's to ask first (`impl.available_for(params)`), so that an unavailable
    case is a skip, not an error.
    """
    from harness import registry
    from harness.variants import get_variant

    spec = get_variant(variant)
    impl = registry.get(variant, implementation)
    if inputs is None:
        inputs = spec.make_inputs(params, seed=seed)
    registry.check_inputs(variant, inputs)
    dout = None
    if params.direction != "fwd":
        inputs = inputs.with_grad()  # fresh leaves: each case's gradients are its own
        dout = make_dout(inputs.args[0], seed)
    return Prepared(impl, inputs, params, spec.flops(params), spec.tokens(params), spec.bytes_moved(params), dout)


def make_dout(like: torch.Tensor, seed: int) -> torch.Tensor:
    """The output gradient of a backward case: random, from the case's seed (the same on every side)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    values = torch.randn(tuple(like.shape), generator=gen, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)


def prepare_case(case: Case, seed: int = 0) -> Prepared:
    return prepare(case.variant, case.implementation, case.params, seed)


# ----------------------------------------------------------------------------- the worker side


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return any(marker in str(exc).lower() for marker in OOM_MARKERS)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"


def failure_of(exc: BaseException) -> Outcome:
    """A kernel's exception as an outcome: oom or error, with the message and where it was raised."""
    message = first_line(exc, 500)
    status = Status.oom if _is_oom(exc) else Status.error
    return Outcome.failure(status, f"{type(exc).__name__}: {message}{_where(exc)}")


class CaseRunner:
    """Runs cases one after another in a worker, reusing a shape's inputs and reference across implementations."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._inputs: Inputs | None = None
        self._baseline: Any = None
        self._grad_baseline: Any = None

    def forget(self) -> None:
        self._key = self._inputs = self._baseline = self._grad_baseline = None

    def _shape(self, request: CaseRequest, params: Params, with_accuracy: bool) -> tuple[Inputs, Any]:
        from harness import registry
        from harness.accuracy import baseline
        from harness.variants import get_variant

        # The directions of one shape share its inputs and references.
        key = (request.variant, replace(params, direction="fwd"), request.seed)
        if key != self._key:
            self.forget()  # free the previous shape's tensors first
            self._inputs = get_variant(request.variant).make_inputs(params, seed=request.seed)
            self._key = key
        if with_accuracy and self._baseline is None:
            spec = get_variant(request.variant)
            self._baseline = baseline(spec, self._inputs, registry.get(request.variant, "naive").fn)
        return self._inputs, self._baseline if with_accuracy else None

    def _grads(self, request: CaseRequest, dout: Any) -> Any:
        from harness import registry
        from harness.accuracy import grad_baseline
        from harness.variants import get_variant

        if self._grad_baseline is None:
            naive = registry.get(request.variant, "naive").fn
            self._grad_baseline = grad_baseline(get_variant(request.variant), self._inputs, dout, naive)
        return self._grad_baseline

    def run(self, request: CaseRequest) -> Outcome:
        import torch

        training = request.params.get("direction", "fwd") != "fwd"
        try:
            with torch.no_grad() if training else torch.inference_mode():  # the timed step enables grad itself
                return self._run(request)
        except BaseException as exc:  # a kernel's failure is a result, not the worker's end
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            self.forget()
            return failure_of(exc)

    def _run(self, request: CaseRequest) -> Outcome:
        import torch

        from harness import registry
        from harness.memory import peak_memory
        from harness.timing import CaptureError, mode_refusal, time_callable

        params = Params(**request.params)
        measure = set(request.measure)
        if params.threads is not None:
            torch.set_num_threads(params.threads)
        if request.implementation not in registry.names(request.variant):
            return Outcome.failure(Status.skipped, f"no implementation {request.implementation!r} in this source tree")
        impl = registry.get(request.variant, request.implementation)
        ok, why = impl.available_for(params)
        if not ok:
            return Outcome.failure(Status.skipped, why)
        refusal = mode_refusal(request.timing.mode, params.device) if "time" in measure else ""
        if refusal:
            return Outcome.failure(Status.skipped, refusal)
        if request.cpus and hasattr(os, "sched_setaffinity"):
            # On a shared VM one core can be slower than another for minutes; that must fall on both
            # sides of an A/B pair.
            os.sched_setaffinity(0, request.cpus)
        if request.fresh_inputs:
            # New allocations, new addresses: a layout that happens to suit (or hurt) one process
            # must not persist through every round of an A/B comparison.
            self.forget()
        inputs, base = self._shape(request, params, "accuracy" in measure)
        case = prepare(request.variant, request.implementation, params, inputs=inputs)
        result: dict[str, Any] = {
            "threads_used": torch.get_num_threads(),
            "source_file": inspect.getsourcefile(impl.fn),  # which tree's kernel was measured
        }
        training = params.direction != "fwd"
        started = time.perf_counter()
        with torch.enable_grad() if training else contextlib.nullcontext():
            output = case.call()  # first call: never timed (lazy init, compilation, autotuning)
            if training and isinstance(output, torch.Tensor):
                output.backward(case.dout)  # ... and the first backward neither
        if params.device.startswith("cuda"):
            torch.cuda.synchronize(params.device)
        # What a user pays once per shape (compilation above all): reported, never mixed into time_s.
        result["first_call_s"] = time.perf_counter() - started
        # Memory held after the first call is the kernel's one-time set-up (CUDA context, handles,
        # compiled code, caches); what the process gains after it, over many calls, is a leak.
        settled = settled_rss()
        if not isinstance(output, torch.Tensor):
            return Outcome.failure(Status.error, f"returned {type(output).__name__}, expected a torch.Tensor")
        expected = tuple(inputs.args[0].shape)
        if tuple(output.shape) != expected:
            return Outcome.failure(Status.error, f"wrong output shape {tuple(output.shape)}, expected {expected}")
        reason = ""
        if base is not None:
            accuracy = base.judge(output.detach())
            result.update(accuracy.as_record())
            reason = "" if accuracy.accurate else accuracy.reason
            if training:
                grads = self._grads(request, case.dout).judge(case.grads())
                result.update(grads.as_record())
                result["accurate"] = accuracy.accurate and grads.accurate
                reason = "; ".join(r for r in (reason, grads.reason) if r)
        del output
        case.clear_grads()
        with torch.enable_grad() if training else contextlib.nullcontext():
            if training and "memory" in measure:
                result["saved_bytes"] = saved_bytes(case, params.device)
            step = case.step()  # bwd: builds the graph its timed backward calls reuse
            if training:
                # One untimed step first: the first retained-graph backward (or forward+backward) grows the
                # heap in a pattern later steps reuse (chunked fwd_bwd at N=4096: 824 MiB on the first
                # step, 280-288 MiB on every later one), and the peak a training loop sees is the later one.
                step()
            if "memory" in measure:
                result["peak_memory_bytes"] = peak_memory(step, params.device)
            if "time" in measure:
                try:
                    stats = time_callable(step, request.timing, params.device)
                except CaptureError as exc:  # refused, not replaced by another mode
                    return Outcome.failure(Status.skipped, f"timing mode cudagraph: the kernel {exc}")
                result["time_s"] = stats.as_record()
                result["tflops"] = case.flops / stats.median / 1e12
                result["tokens_per_s"] = case.tokens / stats.median
                result["bytes_moved"] = case.bytes_moved
                result["gbps"] = case.bytes_moved / stats.median / 1e9
                if params.device.startswith("cuda"):
                    from harness.gpu import sm_clock_mhz

                    result["gpu_clock_mhz"] = sm_clock_mhz(params.device)  # right after timing: throttling shows
            del step
        case.clear_grads()
        grown = settled_rss() - settled
        if grown > LEAK_LIMIT_BYTES:
            # The worker ends after this reply (harness.worker replaces a worker whose reply says so).
            result["leak_note"] = (
                f"the worker held {grown / 2**20:.0f} MiB more (malloc in use) after this case's calls than "
                "after its first call; worker replaced"
            )
        return Outcome(status=Status.ok, reason=reason, **result)


def _allocated(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return settled_rss()


def saved_bytes(case: Prepared, device: str) -> int:
    """What a forward leaves allocated for its backward beyond its inputs and its output.

    The allocator's bytes in use (CPU: malloc's, through mallinfo2; CUDA: the caching allocator's)
    after a forward with grad enabled, minus before, minus the output: naive keeps its N² probabilities,
    a FlashAttention-style kernel O(N) row statistics.
    """
    before = _allocated(device)
    out = case.call()
    after = _allocated(device)
    size = out.numel() * out.element_size()
    del out
    return max(0, after - before - size)


def run_task(request: TaskRequest) -> Outcome:
    """A task case: train (or load) the task's model, evaluate `implementation` against naive."""
    import torch

    from harness import registry

    try:
        impl = registry.get(request.variant, request.implementation)
        ok, why = impl.available("cpu", "float32")
        if not ok:
            return Outcome.failure(Status.skipped, why)
        from harness.tasks import run_task as run_application_task

        if request.threads:
            torch.set_num_threads(request.threads)
        return Outcome(**run_application_task(request.task, request.implementation, request.cache_dir))
    except Exception as exc:
        return failure_of(exc)


_RUNNER: CaseRunner | None = None


def handle(request: Request) -> Any:
    """The worker's handler (harness.worker.serve calls it for every request)."""
    global _RUNNER
    if isinstance(request, NamesRequest):
        from harness import registry
        from harness.variants import VARIANTS

        return {variant: registry.names(variant) for variant in VARIANTS}
    if isinstance(request, TaskRequest):
        return run_task(request)
    if _RUNNER is None:
        _RUNNER = CaseRunner()
    return _RUNNER.run(request)


def start_worker() -> None:
    """Called in a fresh worker before it says it is ready: load the registry (and its plugins)."""
    from harness import registry

    registry.load()


# ----------------------------------------------------------------------------- the parent side


# CPU flags that mean a native matmul in that dtype (x86 AVX512/AMX; Arm's bf16 and half-precision
# SIMD). Without them torch converts to float32 around every GEMM, several times slower than float32
# itself: a bfloat16 chunked attention at N=8192 ran past 300 s on an AVX2 EPYC.
NATIVE_MATMUL_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
    "float16": ("avx512_fp16", "amx_fp16", "fphp", "asimdhp"),
}
# Emulated cases above this much work are skipped (said so in the record), not left to time out.
EMULATED_MAX_FLOPS = 4e9


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


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


def request_for(case: Case, suite: Suite) -> CaseRequest | TaskRequest:
    if case.task:
        return TaskRequest(
            task=case.task,
            variant=case.variant,
            implementation=case.implementation,
            threads=suite.sweeps[0].threads[0] if suite.sweeps else None,
        )
    return CaseRequest(
        variant=case.variant,
        implementation=case.implementation,
        params=case.params.as_dict(),
        measure=list(suite.measure),
        timing=suite.timing,
        seed=suite.seed,
    )


def records_of(suite: str, case: Case, outcome: Outcome) -> list[Record]:
    """The records of one case: one, or for a task one per metric (DESIGN's task record keys)."""
    fields = outcome.fields
    if not case.task:
        return [new_record(suite, case.variant, case.implementation, case.case_id, case.params.as_dict(), **fields)]
    metrics = fields.pop("task_metrics", None)
    common = {"task": case.task, "task_case": case.case_id}
    if not metrics:
        return [new_record(suite, case.variant, case.implementation, case.case_id, {}, **common, **fields)]
    return [
        new_record(
            suite, case.variant, case.implementation, f"{case.case_id}/{m['metric']}", {}, **common, **fields, **m
        )
        for m in metrics
    ]


def new_worker(tree: str | Path | None = None) -> Worker:
    """A worker process (started on first use) that measures with this module's handler."""
    return Worker(handle, start_worker, tree=tree)


def worker_names(worker: Any) -> dict[str, list[str]]:
    """The implementations registered in a worker's source tree, per variant."""
    from harness.errors import InputError

    reply = worker.run(NamesRequest(), timeout_s=120, memory_limit=None)
    if isinstance(reply, Outcome):
        raise InputError(f"cannot list implementations in {worker.tree or 'this tree'}: {reply.reason}")
    return reply


def measure_one(worker: Any, case: Case, request: CaseRequest | TaskRequest, limits: Limits) -> Outcome:
    """One case's outcome: a skip decided here, or the worker's reply (a failure of the worker included)."""
    why = skip_reason(case)
    if why:
        return Outcome.failure(Status.skipped, why)
    return worker.run(request, limits.timeout_s, limits.memory_bytes)


def measure_cases(
    suite: Suite,
    cases: list[Case],
    emit: Callable[[Case, list[Record]], None],
    on_start: Callable[[Case], None] | None = None,
) -> int:
    """Measure `cases` one after another in a worker process, handing each case's records to `emit`.

    Returns how many worker processes it started (1 unless a case crashed, hung or leaked).
    """
    worker = new_worker()
    interrupted = False
    try:
        for case in cases:
            if on_start is not None:
                on_start(case)
            outcome = measure_one(worker, case, request_for(case, suite), suite.limits)
            emit(case, records_of(suite.name, case, outcome))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        worker.stop(kill=interrupted)
    return worker.starts
