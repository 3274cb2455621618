"""The `triton` kernel without a GPU: forward and backward under triton's interpreter (TRITON_INTERPRET=1,
set by conftest before triton can be imported) on small shapes against the float64 reference, by the
harness's one accuracy rule. The generic tests (test_correctness, test_gradients, the kernel contract)
run it too, wherever they run every available implementation.
"""

from __future__ import annotations

import pytest
import torch

import implementations.triton_flash as triton_flash
from harness import registry
from harness.accuracy import baseline, grad_baseline
from harness.variants import VARIANTS, Params

pytest.importorskip("triton", reason="the test extra installs triton (pip install -e '.[cpu,test]')")


def test_the_kernels_run_interpreted_here():
    assert triton_flash._kernels().INTERPRETED


def _judge(variant: str, params: Params, dtype: str, seed: int = 1) -> None:
    spec = VARIANTS[variant]
    inputs = spec.make_inputs(spec.normalize(params), dtype=dtype, seed=seed)
    base = baseline(spec, inputs, registry.get(variant, "naive").fn)
    out = inputs.call(registry.get(variant, "triton").fn)
    assert out.dtype == inputs.args[0].dtype and out.shape == inputs.args[0].shape
    result = base.judge(out)
    assert result.accurate, f"{variant} {dtype}: {result.reason}"


# Lengths that are not multiples of the interpreter's 32-row tiles, a head_dim that is not a power of
# two (24: padded to 32 on chip), grouped-query attention, cross lengths both ways.
FORWARD = [
    ("self_attention", Params(batch=2, seq_len=67, head_dim=32)),
    ("multi_head", Params(batch=1, heads=3, seq_len=100, head_dim=24)),
    ("causal", Params(batch=2, heads=4, kv_heads=2, seq_len=97, head_dim=16)),
    ("cross_attention", Params(batch=1, heads=4, kv_heads=1, seq_len=45, seq_len_kv=130, head_dim=32)),
    ("cross_attention", Params(batch=1, heads=2, seq_len=130, seq_len_kv=45, head_dim=32, causal=True)),
    ("decode", Params(batch=2, heads=4, kv_heads=2, seq_len=1, seq_len_kv=200, head_dim=32)),
    ("decode", Params(batch=1, heads=4, kv_heads=1, seq_len=5, seq_len_kv=70, head_dim=16)),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("variant", "params"), FORWARD, ids=[f"{v}-{i}" for i, (v, _) in enumerate(FORWARD)])
def test_forward_matches_the_reference(variant, params, dtype):
    _judge(variant, params, dtype)


def test_a_longer_causal_sequence_skips_tiles_above_the_diagonal_exactly():
    _judge("causal", Params(batch=1, heads=2, seq_len=256, head_dim=64), "float32", seed=4)


BACKWARD = [
    ("multi_head", Params(batch=1, heads=2, seq_len=67, head_dim=32)),
    ("causal", Params(batch=2, heads=4, kv_heads=2, seq_len=70, head_dim=16)),
    ("cross_attention", Params(batch=1, heads=4, kv_heads=1, seq_len=45, seq_len_kv=70, head_dim=24)),
    ("cross_attention", Params(batch=1, heads=2, seq_len=70, seq_len_kv=40, head_dim=16, causal=True)),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("variant", "params"), BACKWARD, ids=[f"{v}-{i}" for i, (v, _) in enumerate(BACKWARD)])
def test_backward_matches_float64_autograd(variant, params, dtype):
    spec = VARIANTS[variant]
    inputs = spec.make_inputs(spec.normalize(params), dtype=dtype, seed=2)
    dout = torch.randn(inputs.args[0].shape, generator=torch.Generator().manual_seed(3)).to(inputs.args[0].dtype)
    grads = grad_baseline(spec, inputs, dout, registry.get(variant, "naive").fn)
    leaves = inputs.with_grad()
    with torch.enable_grad():
        leaves.call(registry.get(variant, "triton").fn).backward(dout)
    result = grads.judge({name: t.grad for name, t in leaves.grad_leaves().items()})
    assert result.accurate, f"{variant} {dtype}: {result.reason}"
    assert leaves.args[1].grad.shape == inputs.args[1].shape  # kv heads' gradients summed, not expanded


def test_it_is_available_on_cpu_under_the_interpreter_only_and_says_why_not():
    impl = registry.get("multi_head", "triton")
    assert impl.available("cpu", "float32") == (True, "")
    assert impl.available("cpu", "float64")[1].startswith("the triton kernel takes float32")
    assert "not arbitrary masks" in impl.available("cpu", "float32", masked=True)[1]
    with pytest.raises(ValueError, match="mask must be None"):
        inputs = VARIANTS["multi_head"].make_inputs(Params(heads=2, seq_len=8, head_dim=16))
        impl.fn(*inputs.args, mask=torch.ones(8, 8, dtype=torch.bool))


def test_without_the_interpreter_a_cpu_has_no_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = registry.get("multi_head", "triton").available("cpu", "float32")
    assert not ok and "TRITON_INTERPRET=1" in why


@pytest.mark.slow
def test_the_kernels_compile_for_an_h100_without_one():
    """Ahead-of-time compilation to sm_90 cubin with triton's bundled ptxas: what the GPU compiler would
    reject (the interpreter accepts more) fails here, in CI, without a GPU."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    command = [sys.executable, "tools/triton_compile_check.py", "--arch", "90", "--head-dim", "64"]
    command += ["--dtype", "bfloat16", "float32", "--configs", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all compiled" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith(("forward", "backward_kv", "backward_q"))]
    assert len(rows) == 3 * 2 * 3  # kernels x dtypes x (plain, causal, causal with every modifier and paging)
    assert sum("+mods" in row for row in rows) == 3 * 2
