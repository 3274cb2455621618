"""A case made ready to call: its inputs built from the suite's seed and checked once against the kernel
contract, outside any timed region, and the work one call does.

Every consumer prepares through `prepare(case, seed)`: the worker, `profile`, the asv benchmarks, the
pytest-benchmark kernels and tools/gpu_check, so all of them measure the same call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.shapes import Case, Params

if TYPE_CHECKING:
    import torch

    from harness.registry import Implementation
    from harness.variants import Inputs


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
    setup_s: float | None = None  # the implementation's per-case setup (Implementation.setup), None without one
    setup_bytes: int = 0  # what that setup holds for the calls (a dense mask, a block mask)

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


def prepare(case: Case, seed: int = 0, inputs: Inputs | None = None) -> Prepared:
    """Build (or reuse) the case's inputs from the suite's `seed` and check them once against the kernel
    contract: what the worker, profile, the asv and pytest-benchmark kernels and gpu_check all call.

    Availability is the caller's to ask first (`impl.available_for(params)`), so that an unavailable
    case is a skip, not an error.
    """
    from harness import registry
    from harness.variants import get_variant

    variant, params = case.variant, case.params
    spec = get_variant(variant)
    impl = registry.get(variant, case.implementation)
    if inputs is None:
        inputs = spec.make_inputs(params, seed=seed)
    registry.check_inputs(variant, inputs)
    dout = None
    if params.direction != "fwd":
        inputs = inputs.with_grad()  # fresh leaves: each case's gradients are its own
        dout = make_dout(inputs.args[0], seed)
    prepared = Prepared(
        impl, inputs, params, spec.flops(params, seed), spec.tokens(params), spec.bytes_moved(params, seed), dout
    )
    if impl.setup is not None:
        run_setup(prepared)
    return prepared


def run_setup(case: Prepared) -> None:
    """The implementation's per-case setup, once, outside the timed region: timed as setup_s, its result
    passed to every call of this case (a fresh Inputs: the shape's shared inputs are not touched) and
    freed with the case."""
    import time

    import torch

    from harness.variants import Inputs

    started = time.perf_counter()
    extra = case.impl.setup(*case.inputs.args, **case.inputs.kwargs)
    if case.params.device.startswith("cuda"):
        torch.cuda.synchronize(case.params.device)
    # An empty result is no setup at all (sdpa without modifiers): no setup_s on its record.
    case.setup_s = time.perf_counter() - started if extra else None
    case.setup_bytes = sum(_tensor_bytes(value) for value in extra.values())
    case.inputs = Inputs(case.inputs.args, {**case.inputs.kwargs, **extra})


def make_dout(like: torch.Tensor, seed: int) -> torch.Tensor:
    """The output gradient of a backward case: random, from the case's seed (the same on every side)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    values = torch.randn(tuple(like.shape), generator=gen, dtype=torch.float32)
    return values.to(device=like.device, dtype=like.dtype)


def _tensor_bytes(obj: object) -> int:
    """Bytes of the tensors a setup result holds: a tensor, or an object of tensors (flex's BlockMask)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(x) for x in obj)
    if callable(getattr(obj, "as_tuple", None)):  # flex's BlockMask: its index tensors
        return sum(_tensor_bytes(x) for x in obj.as_tuple() if isinstance(x, torch.Tensor))
    fields = getattr(obj, "__dict__", None)
    if fields:
        return sum(t.numel() * t.element_size() for t in fields.values() if isinstance(t, torch.Tensor))
    return 0
