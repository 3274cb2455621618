"""A GPT-style chatbot with causal attention on generated dialogues whose answers need memory.

A user states a name and a number, chats, then asks for one of them; the bot must answer from the
earlier turn. Metric: answer accuracy (greedy generation through the causal kernel) and perplexity
of held-out dialogues, against a baseline that answers the most frequent answer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harness.tasks.common import Attention, Block, Evaluation, Metric, fit, timed, train_or_load

VARIANT = "causal"
NAMES = ["ann", "bob", "cid", "dee", "eve", "fay", "gus", "hal", "ivy", "jon"]
NUMBERS = [str(i) for i in range(10)]
WORDS = [
    "<pad>",
    "<eos>",
    "user",
    "bot",
    ":",
    ".",
    "?",
    "my",
    "name",
    "is",
    "number",
    "hello",
    "ok",
    "what",
    "nice",
    "day",
    "today",
    "yes",
]
VOCAB = WORDS + NAMES + NUMBERS
ID = {w: i for i, w in enumerate(VOCAB)}


def dialogue(g: torch.Generator) -> tuple[list[int], int]:
    """Token ids of one dialogue and the index of its answer token."""
    name = NAMES[int(torch.randint(0, 10, (1,), generator=g))]
    number = NUMBERS[int(torch.randint(0, 10, (1,), generator=g))]
    ask = "name" if torch.rand(1, generator=g) < 0.5 else "number"
    words = [
        "user",
        ":",
        "my",
        "name",
        "is",
        name,
        ".",
        "bot",
        ":",
        "hello",
        name,
        ".",
        "user",
        ":",
        "my",
        "number",
        "is",
        number,
        ".",
        "bot",
        ":",
        "ok",
        ".",
        "user",
        ":",
        "nice",
        "day",
        "today",
        ".",
        "bot",
        ":",
        "yes",
        ".",
        "user",
        ":",
        "what",
        "is",
        "my",
        ask,
        "?",
        "bot",
        ":",
    ]
    answer_at = len(words)
    words += [name if ask == "name" else number, "<eos>"]
    return [ID[w] for w in words], answer_at


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [dialogue(g) for _ in range(n)]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


class GPT(nn.Module):
    """Token + position embeddings, causal transformer blocks, a language-model head."""

    def __init__(self, attention: Attention, dim: int = 64, heads: int = 4, layers: int = 2, length: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, attention, causal=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def generate(model: GPT, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding; every step runs the causal kernel over the whole prefix."""
    tokens = prompts
    for _ in range(steps):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, prompts.shape[1] :]


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention = Attention(VARIANT)
    train_set, test_set = make_data(4000, seed=11), make_data(1000, seed=12)

    def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def train(model: nn.Module) -> dict:
        def batch(step: int):
            g = torch.Generator().manual_seed(step)
            return (train_set[0][torch.randint(0, len(train_set[0]), (64,), generator=g)],)

        return {"final_loss": fit(model, batch, lm_loss, steps=450)}

    model, info = train_or_load("chatbot", lambda: GPT(attention), train, (dialogue, GPT, Block, run), cache_dir)
    tokens, answer_at = test_set
    at = int(answer_at[0])  # every dialogue has the same layout
    answers = tokens[:, at]
    counts = torch.bincount(train_set[0][:, at], minlength=len(VOCAB))
    baseline_accuracy = float((answers == counts.argmax()).float().mean())
    baseline_ppl = math.exp(float(-(counts.float() / counts.sum()).clamp_min(1e-12).log()[answers].mean()))

    def evaluate() -> Evaluation:
        generated = generate(model, tokens[:, :at], steps=2)
        correct = (generated[:, 0] == answers) & (generated[:, 1] == ID["<eos>"])
        logits = model(tokens[:, :-1])
        nll = nn.functional.cross_entropy(logits[:, at - 1], answers)
        ppl_all = math.exp(float(lm_loss(model, tokens)))
        return Evaluation(
            [
                Metric("answer accuracy", float(correct.float().mean()), baseline_accuracy, "most frequent answer"),
                Metric(
                    "answer perplexity",
                    math.exp(float(nll)),
                    baseline_ppl,
                    "answer frequencies",
                    higher_is_better=False,
                ),
            ],
            generated[:, 0],
            len(tokens),
            extra={"dialogue_perplexity": ppl_all},
        )

    attention.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    return timed(evaluate), reference, info
