"""Text classification with self-attention: sentiment of generated sentences with negation.

Each sentence has one sentiment word; "not" right before it flips the label, and a distracting
"not" elsewhere does not. A bag of words cannot tell the two apart; attention over positions can.
Metric: accuracy, against the majority class and a bag-of-words logistic regression.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.tasks.common import Attention, Block, Evaluation, Metric, fit, timed, train_or_load

VARIANT = "self_attention"
FILLERS = ["the", "movie", "was", "really", "a", "film", "plot", "acting", "very", "quite", "and", "it"]
POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
VOCAB = ["<pad>", "not", *FILLERS, *POSITIVE, *NEGATIVE]
LENGTH = 12


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = {w: i for i, w in enumerate(VOCAB)}
    tokens = torch.randint(2, 2 + len(FILLERS), (n, LENGTH), generator=g)
    labels = torch.empty(n, dtype=torch.long)
    for row in range(n):
        where = int(torch.randint(1, LENGTH, (1,), generator=g))
        positive = bool(torch.rand(1, generator=g) < 0.5)
        words = POSITIVE if positive else NEGATIVE
        tokens[row, where] = ids[words[int(torch.randint(0, 5, (1,), generator=g))]]
        negated = bool(torch.rand(1, generator=g) < 0.5)
        if negated:
            tokens[row, where - 1] = ids["not"]
        if torch.rand(1, generator=g) < 0.3:  # a distracting "not" before a filler
            spots = [i for i in range(LENGTH - 1) if i not in (where - 1, where) and i + 1 != where]
            tokens[row, spots[int(torch.randint(0, len(spots), (1,), generator=g))]] = ids["not"]
        labels[row] = int(positive != negated)
    return tokens, labels


class Classifier(nn.Module):
    """The article's SelfAttention module (one head) over token + position embeddings, mean-pooled."""

    def __init__(self, attention: Attention, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        # Unit-scale positions: attention must tell "right before the sentiment word" from elsewhere.
        self.position = nn.Parameter(torch.randn(LENGTH, dim))
        self.block = Block(dim, 1, attention)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(tokens) + self.position)
        return self.head(x.mean(dim=1))


def baselines(train: tuple, test: tuple) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    def bag(tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens, len(VOCAB)).sum(1).float()

    majority = float((test[1] == train[1].mode().values).float().mean())
    model = LogisticRegression(max_iter=2000).fit(bag(train[0]).numpy(), train[1].numpy())
    return {"majority class": majority, "bag of words": float(model.score(bag(test[0]).numpy(), test[1].numpy()))}


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention = Attention(VARIANT)
    train_set, test_set = make_data(20000, seed=1), make_data(2000, seed=2)

    def train(model: nn.Module) -> dict:
        def batch(step: int):
            g = torch.Generator().manual_seed(step)
            idx = torch.randint(0, len(train_set[0]), (128,), generator=g)
            return train_set[0][idx], train_set[1][idx]

        loss = fit(model, batch, lambda m, x, y: nn.functional.cross_entropy(m(x), y), steps=1500)
        return {"final_loss": loss}

    model, info = train_or_load(
        "text_classification", lambda: Classifier(attention), train, (make_data, Classifier, Block, run), cache_dir
    )
    base = baselines(train_set, test_set)

    def evaluate() -> Evaluation:
        predictions = model(test_set[0]).argmax(-1)
        accuracy = float((predictions == test_set[1]).float().mean())
        return Evaluation(
            [Metric("accuracy", accuracy, base["bag of words"], "bag of words")],
            predictions,
            len(test_set[0]),
            extra={"majority_class": base["majority class"]},
        )

    attention.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    return timed(evaluate), reference, info
