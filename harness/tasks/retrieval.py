"""Image-text matching with cross-modal attention: find the image of "seven two" among 100.

Text tokens (the two digit words) attend over the patches of a candidate image; the attended
summary scores the pair. Trained contrastively; evaluated on all 100 ordered digit pairs, each
with one unseen image. Metrics: Recall@1/5/10 text→image and image→text, against chance (K/100).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.tasks import digits
from harness.tasks.common import Attention, Evaluation, Metric, MultiHeadAttention, fit, timed, train_or_load

VARIANT = "cross_attention"
PATCHES = 2 * 4  # 8 x 16 images in 4 x 4 patches


class Matcher(nn.Module):
    """score(text, image) = w · pool(cross_attention(text tokens → image patches))."""

    def __init__(self, attention: Attention, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.word = nn.Embedding(10, dim)
        self.word_position = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.patch = nn.Sequential(nn.Linear(16, dim), nn.GELU(), nn.Linear(dim, dim))
        self.patch_position = nn.Parameter(torch.randn(PATCHES, dim) * 0.02)
        self.cross = MultiHeadAttention(dim, heads, attention)
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def encode(self, words: torch.Tensor, patch_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.word(words) + self.word_position, self.patch(patch_pixels) + self.patch_position

    def pair_scores(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Scores of every text against every image: (T, I)."""
        t, i = text.shape[0], image.shape[0]
        queries = text[:, None].expand(t, i, *text.shape[1:]).reshape(t * i, *text.shape[1:])
        context = image[None].expand(t, i, *image.shape[1:]).reshape(t * i, *image.shape[1:])
        attended = self.norm(queries + self.cross(queries, context))
        return self.score(torch.cat([attended, queries], -1)).mean(dim=(1, 2)).view(t, i)

    def forward(self, words: torch.Tensor, patch_pixels: torch.Tensor) -> torch.Tensor:
        return self.pair_scores(*self.encode(words, patch_pixels))


def recall_at(scores: torch.Tensor, k: int) -> float:
    """Share of rows whose own column (the diagonal) ranks in the top k."""
    top = scores.topk(k, dim=1).indices
    return float((top == torch.arange(scores.shape[0])[:, None]).any(1).float().mean())


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention = Attention(VARIANT)
    train_pool, test_pool = digits.pools()
    train_labels = torch.randint(0, 10, (6000, 2), generator=torch.Generator().manual_seed(31))
    train_images = digits.patches(digits.compose(train_pool, train_labels, 32))
    test_labels = torch.tensor([[a, b] for a in range(10) for b in range(10)])
    test_images = digits.patches(digits.compose(test_pool, test_labels, 33))

    def contrastive(model: nn.Module, words: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        scores = model(words, images)
        same = (words[:, None] == words[None]).all(-1).float()  # equal captions are positives too
        target = same / same.sum(1, keepdim=True)
        return -(target * scores.log_softmax(1)).sum(1).mean() - (target.T * scores.T.log_softmax(1)).sum(1).mean()

    def train(model: nn.Module) -> dict:
        def batch(step: int):
            idx = torch.randint(0, len(train_labels), (48,), generator=torch.Generator().manual_seed(step))
            return train_labels[idx], train_images[idx]

        return {"final_loss": fit(model, batch, contrastive, steps=600)}

    model, info = train_or_load(
        "retrieval", lambda: Matcher(attention), train, (Matcher, MultiHeadAttention, digits.compose, run), cache_dir
    )

    def evaluate() -> Evaluation:
        scores = model(test_labels, test_images)
        metrics = []
        for k in (1, 5, 10):
            metrics.append(Metric(f"text→image R@{k}", recall_at(scores, k), k / 100, "chance"))
            metrics.append(Metric(f"image→text R@{k}", recall_at(scores.T, k), k / 100, "chance"))
        return Evaluation(metrics, scores.argmax(1), len(test_labels) ** 2)

    attention.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    return timed(evaluate), reference, info
