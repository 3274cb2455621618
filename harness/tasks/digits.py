"""Images composed of scikit-learn's 8x8 digits (shipped inside the package: nothing downloaded)."""

from __future__ import annotations

import functools

import torch

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def pools() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Train and test pools of single digits: disjoint images, so test composites are unseen."""
    images, labels = _digits()
    return (images[:1400], labels[:1400]), (images[1400:], labels[1400:])


def compose(pool: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Images (n, 8, 8·k) showing the digits `labels` (n, k), each drawn from `pool` at random."""
    images, pool_labels = pool
    g = torch.Generator().manual_seed(seed)
    by_digit = [torch.nonzero(pool_labels == d).flatten() for d in range(10)]
    n, k = labels.shape
    out = torch.empty(n, 8, 8 * k)
    for i in range(n):
        for j in range(k):
            choices = by_digit[int(labels[i, j])]
            out[i, :, 8 * j : 8 * j + 8] = images[choices[int(torch.randint(0, len(choices), (1,), generator=g))]]
    return out


def patches(images: torch.Tensor, size: int = 4) -> torch.Tensor:
    """(n, H, W) images as (n, patches, size²) non-overlapping patches, row-major."""
    n, h, w = images.shape
    return images.unfold(1, size, size).unfold(2, size, size).reshape(n, (h // size) * (w // size), size * size)
