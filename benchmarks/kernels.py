"""asv benchmarks generated from the registry and suites/ci.yaml: no second list of kernels.

One class per variant of the CI suite; its parameters are the implementations registered for that
variant and the suite's sequence lengths, so the asv pages show them as axes. An implementation
that cannot run here is skipped the asv way (NotImplementedError in setup), not failed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness import registry, timing
from harness.accuracy import baseline
from harness.suite import load_suite
from harness.variants import VARIANTS, Params

SUITE = load_suite(Path(__file__).resolve().parents[1] / "suites" / "ci.yaml")
SWEEP = SUITE.sweeps[0]


def _params(variant: str, seq_len: int) -> Params:
    return VARIANTS[variant].normalize(
        Params(
            batch=SWEEP.batch[0],
            heads=SWEEP.heads[0],
            seq_len=seq_len,
            head_dim=SWEEP.head_dim[0],
            dtype=SWEEP.dtype[0],
            device="cpu",
            threads=SWEEP.threads[0],
        )
    )


class _KernelBenchmark:
    variant = ""
    timeout = 120
    warmup_time = 0.1

    def setup(self, implementation: str, seq_len: int) -> None:
        impl = registry.get(self.variant, implementation)
        params = _params(self.variant, seq_len)
        ok, why = impl.available_for(params)
        if not ok:
            raise NotImplementedError(why)
        torch.set_num_threads(params.threads or torch.get_num_threads())
        self.params_ = params
        self.inputs = VARIANTS[self.variant].make_inputs(params, seed=SUITE.seed)
        self.fn = impl.fn
        # The harness never times a first call (compilation for flex/compiled.*, lazy set-up for
        # the rest); asv's quick mode times a single call, so it must not be the first either.
        self._call()

    def _call(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.inputs.call(self.fn)

    def time_forward(self, implementation: str, seq_len: int) -> None:
        self._call()

    def peakmem_forward(self, implementation: str, seq_len: int) -> None:
        self._call()

    def track_tflops(self, implementation: str, seq_len: int) -> float:
        settings = timing.TimingSettings(warmup=1, min_time_s=0.2, min_samples=5, max_time_s=2.0)
        median = timing.time_cpu(self._call, settings).median
        return VARIANTS[self.variant].flops(self.params_) / median / 1e12

    track_tflops.unit = "TFLOP/s"

    def track_max_abs_err(self, implementation: str, seq_len: int) -> float:
        base = baseline(VARIANTS[self.variant], self.inputs, registry.get(self.variant, "naive").fn)
        return base.judge(self._call()).max_abs_err

    track_max_abs_err.unit = "max abs error vs float64"


def _make(variant: str) -> type:
    names = (
        registry.names(variant)
        if SUITE.implementations == "all"
        else [n for n in SUITE.implementations if n in registry.names(variant)]
    )
    return type(
        variant,
        (_KernelBenchmark,),
        {
            "variant": variant,
            "params": [names, list(SWEEP.seq_len)],
            "param_names": ["implementation", "seq_len"],
            "__doc__": f"{variant}: forward pass of every registered implementation at CI sizes.",
        },
    )


for _variant in SUITE.variants:
    globals()[_variant] = _make(_variant)
