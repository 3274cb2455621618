"""asv benchmarks over the registry at the sizes of suites/ci.yaml: no second list of kernels.

Forward (`time_forward`, `peakmem_forward`, `track_tflops`, `track_max_abs_err`) and backward
(`time_backward`, `peakmem_backward`: `out.backward(dout)` on a retained graph, as the harness's
`bwd` direction) of every implementation that has one here.

One plain class per variant of the CI suite (asv's own discovery); its parameters are the
implementations registered for that variant and the suite's sequence lengths, so the asv pages show
them as axes. Cases are prepared by harness.prepare.prepare, as the harness's worker prepares them.
An implementation that cannot run here is skipped the asv way (NotImplementedError in setup).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from harness import registry, timing
from harness.accuracy import baseline
from harness.prepare import Prepared, prepare
from harness.shapes import Case
from harness.suite import load_suite
from harness.suite.expand import chosen
from harness.variants import VARIANTS, Params

SUITE = load_suite(Path(__file__).resolve().parents[1] / "suites" / "ci.yaml")
SWEEP = SUITE.sweeps[0]
SEQ_LENS = list(SWEEP.seq_len)


def _params(variant: str, seq_len: int) -> Params:
    """The CI suite's shape for `variant` at `seq_len` (first value of every other axis of its sweep)."""
    sweep = next(s for s in SUITE.sweeps if variant in SUITE.variants_of(s))
    first = {axis: values[0] for axis, values in sweep.model_dump(exclude={"variants"}).items()}
    return VARIANTS[variant].normalize(Params(**(first | {"seq_len": seq_len, "device": "cpu"})))


class _Forward:
    """The forward pass of one implementation at one CI size (asv skips classes starting with _)."""

    variant = ""
    param_names = ["implementation", "seq_len"]
    timeout = 120
    warmup_time = 0.1

    def setup(self, implementation: str, seq_len: int) -> None:
        params = _params(self.variant, seq_len)
        ok, why = registry.get(self.variant, implementation).available_for(params)
        if not ok:
            raise NotImplementedError(why)
        torch.set_num_threads(params.threads or torch.get_num_threads())
        self.case: Prepared = prepare(Case(SUITE.name, self.variant, implementation, params), seed=SUITE.seed)
        # The harness never times a first call (compilation for flex/compiled.*, lazy set-up for
        # the rest); asv's quick mode times a single call, so it must not be the first either.
        self._call()

    def _call(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.case.call()

    def time_forward(self, implementation: str, seq_len: int) -> None:
        self._call()

    def peakmem_forward(self, implementation: str, seq_len: int) -> None:
        self._call()

    def track_tflops(self, implementation: str, seq_len: int) -> float:
        settings = timing.TimingSettings(warmup=1, min_time_s=0.2, min_samples=5, max_time_s=2.0)
        return self.case.flops / timing.time_cpu(self._call, settings).median / 1e12

    track_tflops.unit = "TFLOP/s"

    def track_max_abs_err(self, implementation: str, seq_len: int) -> float:
        base = baseline(VARIANTS[self.variant], self.case.inputs, registry.get(self.variant, "naive").fn)
        return base.judge(self._call()).max_abs_err

    track_max_abs_err.unit = "max abs error vs float64"


class _Backward:
    """The backward pass: `out.backward(dout)` on a retained graph after an untimed forward."""

    variant = ""
    param_names = ["implementation", "seq_len"]
    timeout = 120
    warmup_time = 0.1

    def setup(self, implementation: str, seq_len: int) -> None:
        params = replace(_params(self.variant, seq_len), direction="bwd")
        ok, why = registry.get(self.variant, implementation).available_for(params)
        if not ok:
            raise NotImplementedError(why)
        torch.set_num_threads(params.threads or torch.get_num_threads())
        self.case: Prepared = prepare(Case(SUITE.name, self.variant, implementation, params), seed=SUITE.seed)
        with torch.enable_grad():
            self.backward = self.case.step()  # the untimed forward whose graph every call reuses
            self.backward()  # the first backward (lazy set-up, compilation) is not timed either

    def time_backward(self, implementation: str, seq_len: int) -> None:
        with torch.enable_grad():
            self.backward()

    def peakmem_backward(self, implementation: str, seq_len: int) -> None:
        with torch.enable_grad():
            self.backward()


class self_attention(_Forward):  # noqa: N801 - asv names benchmarks after the class: the variant's name
    """self_attention: forward pass of every registered implementation at CI sizes."""

    variant = "self_attention"
    params = [chosen(SUITE, variant), SEQ_LENS]


class multi_head(_Forward):  # noqa: N801
    """multi_head: forward pass of every registered implementation at CI sizes."""

    variant = "multi_head"
    params = [chosen(SUITE, variant), SEQ_LENS]


class causal(_Forward):  # noqa: N801
    """causal: forward pass of every registered implementation at CI sizes."""

    variant = "causal"
    params = [chosen(SUITE, variant), SEQ_LENS]


class cross_attention(_Forward):  # noqa: N801
    """cross_attention: forward pass of every registered implementation at CI sizes (Nkv from the suite)."""

    variant = "cross_attention"
    params = [chosen(SUITE, variant), SEQ_LENS]


class attention_gate(_Forward):  # noqa: N801
    """attention_gate: forward pass of every registered implementation at CI sizes."""

    variant = "attention_gate"
    params = [chosen(SUITE, variant), SEQ_LENS]


class self_attention_backward(_Backward):  # noqa: N801
    """self_attention: backward pass of every implementation that has one here, at CI sizes."""

    variant = "self_attention"
    params = [chosen(SUITE, variant), SEQ_LENS]


class multi_head_backward(_Backward):  # noqa: N801
    """multi_head: backward pass of every implementation that has one here, at CI sizes."""

    variant = "multi_head"
    params = [chosen(SUITE, variant), SEQ_LENS]


class causal_backward(_Backward):  # noqa: N801
    """causal: backward pass of every implementation that has one here, at CI sizes."""

    variant = "causal"
    params = [chosen(SUITE, variant), SEQ_LENS]


class cross_attention_backward(_Backward):  # noqa: N801
    """cross_attention: backward pass of every implementation that has one here, at CI sizes."""

    variant = "cross_attention"
    params = [chosen(SUITE, variant), SEQ_LENS]


class attention_gate_backward(_Backward):  # noqa: N801
    """attention_gate: backward pass of every implementation that has one here, at CI sizes."""

    variant = "attention_gate"
    params = [chosen(SUITE, variant), SEQ_LENS]
