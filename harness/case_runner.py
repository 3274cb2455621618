"""The worker side of measuring: one case request in, one outcome out.

Runs in the spawned worker process (harness.worker.serve calls `handle`). A case goes through named
steps: availability, first call, output check, accuracy against the float64 reference, memory, time,
and the figures derived from them. A kernel's exception is an outcome (error or oom), never the
worker's end.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from harness.errors import first_line
from harness.messages import CaseRequest, NamesRequest, Request, TaskRequest
from harness.prepare import Prepared, prepare
from harness.results import Outcome, Status
from harness.shapes import Case, Params
from harness.worker import LEAK_LIMIT_BYTES, settled_rss

if TYPE_CHECKING:
    from harness.variants import Inputs


OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


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
    """Runs cases one after another in a worker, reusing a shape's inputs and reference across implementations.

    A case is a sequence of named steps (`_run`); each either adds its figures to the result or ends
    the case with an outcome that says why.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._inputs: Inputs | None = None
        self._baseline: Any = None
        self._grad_baseline: Any = None

    def forget(self) -> None:
        self._key = self._inputs = self._baseline = self._grad_baseline = None

    def held_bytes(self) -> int:
        """Bytes of the tensors this runner keeps between cases (inputs, references): the harness's, not
        a kernel's, so the worker's leak judgement leaves them out."""
        tensors: list[Any] = [] if self._inputs is None else self._inputs.tensors()
        if self._baseline is not None:
            tensors += [self._baseline.reference, self._baseline.naive_output]
        if self._grad_baseline is not None:
            tensors += [*self._grad_baseline.reference.values(), *self._grad_baseline.naive.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.device.type == "cpu")

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

        params = Params(**request.params)
        measure = set(request.measure)
        if params.threads is not None:
            torch.set_num_threads(params.threads)
        refused = self._refusal(request, params)
        if refused is not None:
            return refused
        self._placement(request)
        inputs, base = self._shape(request, params, "accuracy" in measure)
        case = prepare(Case("", request.variant, request.implementation, params), request.seed, inputs=inputs)
        result: dict[str, Any] = {
            "threads_used": torch.get_num_threads(),
            "source_file": inspect.getsourcefile(case.impl.fn),  # which tree's kernel was measured
            **work_of(request.variant, params, request.seed),
        }
        if case.setup_s is not None:
            result["setup_s"] = case.setup_s
        output, result["first_call_s"] = self._first_call(case)
        # Memory held after the first call is the kernel's one-time set-up (CUDA context, handles,
        # compiled code, caches); what the process gains after it, over many calls, is a leak.
        settled = settled_rss()
        wrong = self._wrong_output(output, inputs)
        if wrong is not None:
            return wrong
        reason = self._accuracy(request, case, base, output, result)
        del output
        case.clear_grads()
        refused = self._measure(case, request, measure, result)
        if refused is not None:
            return refused
        case.clear_grads()
        self._leak(settled, result)
        return Outcome(status=Status.ok, reason=reason, **result)

    @staticmethod
    def _refusal(request: CaseRequest, params: Params) -> Outcome | None:
        """Availability: a case this tree, this implementation or the timing mode cannot run is a skip."""
        from harness import registry
        from harness.timing import mode_refusal

        if request.implementation not in registry.names(request.variant):
            return Outcome.failure(Status.skipped, f"no implementation {request.implementation!r} in this source tree")
        ok, why = registry.get(request.variant, request.implementation).available_for(params)
        if not ok:
            return Outcome.failure(Status.skipped, why)
        refusal = mode_refusal(request.timing.mode, params.device) if "time" in request.measure else ""
        return Outcome.failure(Status.skipped, refusal) if refusal else None

    def _placement(self, request: CaseRequest) -> None:
        if request.cpus and hasattr(os, "sched_setaffinity"):
            # On a shared VM one core can be slower than another for minutes; that must fall on both
            # sides of an A/B pair.
            os.sched_setaffinity(0, request.cpus)
        if request.fresh_inputs:
            # New allocations, new addresses: a layout that happens to suit (or hurt) one process
            # must not persist through every round of an A/B comparison.
            self.forget()

    @staticmethod
    def _first_call(case: Prepared) -> tuple[Any, float]:
        """The first call, never timed (lazy init, compilation, autotuning), and what it took: what a user
        pays once per shape (compilation above all), reported, never mixed into time_s."""
        import torch

        training = case.params.direction != "fwd"
        started = time.perf_counter()
        with torch.enable_grad() if training else contextlib.nullcontext():
            output = case.call()
            if training and isinstance(output, torch.Tensor):
                output.backward(case.dout)  # ... and the first backward neither
        if case.params.device.startswith("cuda"):
            torch.cuda.synchronize(case.params.device)
        return output, time.perf_counter() - started

    @staticmethod
    def _wrong_output(output: Any, inputs: Inputs) -> Outcome | None:
        import torch

        if not isinstance(output, torch.Tensor):
            return Outcome.failure(Status.error, f"returned {type(output).__name__}, expected a torch.Tensor")
        expected = tuple(inputs.args[0].shape)
        if tuple(output.shape) != expected:
            return Outcome.failure(Status.error, f"wrong output shape {tuple(output.shape)}, expected {expected}")
        return None

    def _accuracy(self, request: CaseRequest, case: Prepared, base: Any, output: Any, result: dict) -> str:
        """The output (and, training, each gradient) against the float64 reference; the reason if inaccurate."""
        if base is None:
            return ""
        accuracy = base.judge(output.detach())
        result.update(accuracy.as_record())
        if case.params.direction == "fwd":
            return "" if accuracy.accurate else accuracy.reason
        grads = self._grads(request, case.dout).judge(case.grads())
        result.update(grads.as_record())
        result["accurate"] = accuracy.accurate and grads.accurate
        return "; ".join(r for r in (accuracy.reason if not accuracy.accurate else "", grads.reason) if r)

    @staticmethod
    def _measure(case: Prepared, request: CaseRequest, measure: set[str], result: dict) -> Outcome | None:
        """Saved bytes, peak memory, then time and the figures derived from it."""
        import torch

        from harness.memory import peak_memory
        from harness.timing import CaptureError, time_callable

        params = case.params
        training = params.direction != "fwd"
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
                # What the implementation's setup holds for its calls (a dense mask) is its memory too.
                result["peak_memory_bytes"] = peak_memory(step, params.device) + case.setup_bytes
            if "time" in measure:
                try:
                    stats = time_callable(step, request.timing, params.device)
                except CaptureError as exc:  # refused, not replaced by another mode
                    return Outcome.failure(Status.skipped, f"timing mode cudagraph: the kernel {exc}")
                result.update(derived(case, stats))
            del step
        return None

    @staticmethod
    def _leak(settled: int, result: dict) -> None:
        grown = settled_rss() - settled
        if grown > LEAK_LIMIT_BYTES:
            # The worker ends after this reply (harness.worker replaces a worker whose reply says so).
            result["leak_note"] = (
                f"the worker held {grown / 2**20:.0f} MiB more (malloc in use) after this case's calls than "
                "after its first call; worker replaced"
            )


def work_of(variant: str, params: Params, seed: int) -> dict[str, Any]:
    """What a case's masks leave of the dense work (density), the documents' lengths it packs and the
    requests' cache lengths it serves."""
    from harness import shapes
    from harness.variants import get_variant

    spec = get_variant(variant)
    if spec.kind != "dot_product":
        return {}
    work: dict[str, Any] = {"density": spec.density(params, seed)}
    lengths = shapes.document_lengths(params, seed)
    if lengths is not None:
        work["doc_lens"] = lengths
    caches = shapes.cache_lengths(params, seed) if variant == "decode" else None
    if caches is not None:
        work["cache_lens"] = caches
    return work


def derived(case: Prepared, stats: Any) -> dict[str, Any]:
    """The figures a median gives: time_s, TFLOP/s, tokens/s, GB/s (and a CUDA case's SM clock right after
    its timing, so that throttling shows)."""
    result = {
        "time_s": stats.as_record(),
        "tflops": case.flops / stats.median / 1e12,
        "tokens_per_s": case.tokens / stats.median,
        "bytes_moved": case.bytes_moved,
        "gbps": case.bytes_moved / stats.median / 1e9,
    }
    if case.params.device.startswith("cuda"):
        from harness.gpu import sm_clock_mhz

        result["gpu_clock_mhz"] = sm_clock_mhz(case.params.device)
    return result


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
        return Outcome(**run_application_task(request.task, request.implementation, request.cache_dir, request.options))
    except Exception as exc:
        return failure_of(exc)


_RUNNER = CaseRunner()


def handle(request: Request) -> Any:
    """The worker's handler (harness.worker.serve calls it for every request)."""
    if isinstance(request, NamesRequest):
        from harness import registry
        from harness.variants import VARIANTS

        return {variant: registry.names(variant) for variant in VARIANTS}
    if isinstance(request, TaskRequest):
        return run_task(request)
    return _RUNNER.run(request)


def held_bytes() -> int:
    """The worker's own tensors (harness.worker leaves them out of its leak judgement)."""
    return _RUNNER.held_bytes()


def start_worker() -> None:
    """Called in a fresh worker before it says it is ready: load the registry (and its plugins)."""
    from harness import registry

    registry.load()
