"""Image captioning with multi-head attention: name the three digits in a composed image.

Three learned caption slots and the image's patches attend to each other in multi-head blocks; each
slot then predicts one digit word. Metrics: exact match of the whole caption and token accuracy,
against always answering the most frequent word.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.tasks import digits
from harness.tasks.common import Attention, Block, Evaluation, Metric, fit, timed, train_or_load

VARIANT = "multi_head"
SLOTS = 3
PATCHES = 2 * 6  # 8 x 24 image in 4 x 4 patches


def make_data(n: int, pool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 10, (n, SLOTS), generator=torch.Generator().manual_seed(seed))
    return digits.patches(digits.compose(pool, labels, seed + 1)), labels


class Captioner(nn.Module):
    """Caption slots + patch embeddings through multi-head blocks; a word per slot."""

    def __init__(self, attention: Attention, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Linear(16, dim)
        self.position = nn.Parameter(torch.randn(PATCHES, dim) * 0.02)
        self.slots = nn.Parameter(torch.randn(SLOTS, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(digits.WORDS))

    def forward(self, patch_pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(patch_pixels) + self.position
        x = torch.cat([self.slots.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x)[:, :SLOTS]))


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention = Attention(VARIANT)
    train_pool, test_pool = digits.pools()
    train_set, test_set = make_data(6000, train_pool, seed=21), make_data(1000, test_pool, seed=22)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1))

    def train(model: nn.Module) -> dict:
        def batch(step: int):
            idx = torch.randint(0, len(train_set[0]), (64,), generator=torch.Generator().manual_seed(step))
            return train_set[0][idx], train_set[1][idx]

        return {"final_loss": fit(model, batch, loss, steps=700)}

    model, info = train_or_load(
        "captioning", lambda: Captioner(attention), train, (make_data, Captioner, Block, digits.compose, run), cache_dir
    )
    frequent = train_set[1].flatten().mode().values
    base_token = float((test_set[1] == frequent).float().mean())
    base_exact = float((test_set[1] == frequent).all(-1).float().mean())

    def evaluate() -> Evaluation:
        words = model(test_set[0]).argmax(-1)
        right = words == test_set[1]
        return Evaluation(
            [
                Metric("exact match", float(right.all(-1).float().mean()), base_exact, "most frequent word"),
                Metric("token accuracy", float(right.float().mean()), base_token, "most frequent word"),
            ],
            words,
            len(test_set[0]),
        )

    attention.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    return timed(evaluate), reference, info
