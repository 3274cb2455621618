"""What every task shares: the attention hook, training with a fixed seed, the weight cache, and
evaluation of one implementation against `naive` on the same trained weights.

A task trains once (with `naive`, the reference kernel), caches its weights in the cache folder, and
then swaps the attention implementation at evaluation: the metric, the agreement of predictions
with naive's, and the evaluation throughput are measured per implementation.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import registry
from harness.cache import task_cache_dir


class Attention:
    """The registry kernel a model calls; swapped between training and each evaluation."""

    def __init__(self, variant: str, name: str = "naive") -> None:
        self.variant = variant
        self.use(name)

    def use(self, name: str) -> None:
        self.name = name
        self.fn = registry.get(self.variant, name).fn

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)


class MultiHeadAttention(nn.Module):
    """q/k/v projections, the registry kernel, an output projection (heads=1: the article's SelfAttention)."""

    def __init__(self, dim: int, heads: int, attention: Attention, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal, self.attention = heads, causal, attention
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x, k and v from the context, each (B, heads, N, D)."""
        return self._split(self.q(x)), self._split(self.k(context)), self._split(self.v(context))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, heads, N, D) back to (B, N, dim), through the output projection."""
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, x if context is None else context)
        return self.merge(self.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=self.causal))


class Block(nn.Module):
    """Pre-norm transformer block around MultiHeadAttention."""

    def __init__(self, dim: int, heads: int, attention: Attention, causal: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, attention, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class Metric:
    name: str
    value: float
    baseline: float | None = None
    baseline_name: str = ""
    higher_is_better: bool = True


@dataclass
class Evaluation:
    """What evaluating one implementation gives: metrics, the predictions, and the time it took."""

    metrics: list[Metric]
    predictions: torch.Tensor
    samples: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def source_hash(*objects: Any) -> str:
    """Hash of the code a cached model depends on: change the code, and the cache is rebuilt."""
    digest = hashlib.sha256(torch.__version__.encode())
    for obj in objects:
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()[:16]


def train_or_load(
    name: str,
    make_model: Callable[[], nn.Module],
    train: Callable[[nn.Module], dict],
    code: tuple,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, dict]:
    """The trained model of a task: from the cache when torch and the task's code are unchanged."""
    cache_dir = Path(cache_dir or task_cache_dir())
    key = source_hash(*code)
    path = cache_dir / f"{name}-{key}.pt"
    model = make_model()
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            info = dict(state["info"]) | {"cached": True}
            return model.eval(), info
        except Exception:  # a torn or foreign file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    torch.manual_seed(0)
    model = make_model()
    start = time.perf_counter()
    info = train(model)
    info["train_seconds"] = time.perf_counter() - start
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"{name}-*.pt"):
        if stale.stem.rsplit("-", 1)[0] == name:  # not "segmentation-nogate" when name is "segmentation"
            stale.unlink()
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "info": info, "torch": str(torch.__version__)}, tmp)
    tmp.replace(path)
    return model.eval(), info | {"cached": False}


def fit(model: nn.Module, batches: Callable[[int], tuple], loss_fn: Callable, steps: int, lr: float = 3e-3) -> float:
    """Adam with a cosine schedule; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        inputs = batches(step)
        loss = loss_fn(model, *inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def timed(fn: Callable[[], Evaluation]) -> Evaluation:
    start = time.perf_counter()
    with torch.inference_mode():
        result = fn()
    result.seconds = time.perf_counter() - start
    return result
