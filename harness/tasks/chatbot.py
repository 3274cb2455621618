"""A GPT-style chatbot with causal attention on generated dialogues whose answers need memory.

A user states a name and a number, chats, then asks for one of them; the bot must answer from the
earlier turn. Metric: answer accuracy and perplexity of held-out dialogues, against a baseline that
answers the most frequent answer.

Answers are generated as a server does: the prompt is prefilled through the causal kernel, which
fills a KV cache per layer, and each new token then goes through the decode kernel against that
cache. The record's tokens_per_s is generated tokens per second of that loop. A ragged batch of
prompts is then served as a server does, through a paged KV cache whose pages are handed out as tokens
arrive; its tokens must agree with the same batch in contiguous caches (task_extra: paged_agreement).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from harness.tasks.common import Attention, Block, Evaluation, Metric, fit, timed, train_or_load

DECODE = "decode"

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


class KVCache:
    """Per layer, keys and values of every position so far: (layers, B, H, length, D), filled in order.

    Slices of the preallocated buffers along the length are what the decode kernels receive, as a
    serving stack's contiguous cache (B and H stay mergeable, so no kernel has to copy them).
    """

    def __init__(self, model: GPT, batch: int) -> None:
        attn = model.blocks[0].attn
        dim = model.embed.embedding_dim
        shape = (len(model.blocks), batch, attn.heads, model.position.shape[0], dim // attn.heads)
        self.k = torch.empty(shape, dtype=model.embed.weight.dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0


def _cached_block(block: Block, x: torch.Tensor, k_cache, v_cache, start: int, kernel: Attention) -> torch.Tensor:
    """One transformer block on positions start.. start + n, appending their keys and values to the cache."""
    attn, n = block.attn, x.shape[1]
    h = block.norm1(x)
    q, k, v = attn.project(h, h)
    k_cache[:, :, start : start + n] = k
    v_cache[:, :, start : start + n] = v
    # The prompt (start 0) is causal attention over itself; a step's n new tokens are decode's
    # bottom-right causality, which a single token does not need.
    causal = n > 1
    y = kernel(q.contiguous(), k_cache[:, :, : start + n], v_cache[:, :, : start + n], causal=causal)
    x = x + attn.merge(y)
    return x + block.mlp(block.norm2(x))


def cached_logits(model: GPT, tokens: torch.Tensor, cache: KVCache, kernel: Attention) -> torch.Tensor:
    """Logits of `tokens` placed after the cache's positions, through `kernel`; the cache grows by them."""
    start, n = cache.length, tokens.shape[1]
    x = model.embed(tokens) + model.position[start : start + n]
    for layer, block in enumerate(model.blocks):
        x = _cached_block(block, x, cache.k[layer], cache.v[layer], start, kernel)
    cache.length += n
    return model.head(model.norm(x))


def generate(model: GPT, prompts: torch.Tensor, steps: int, prefill: Attention, decode: Attention) -> torch.Tensor:
    """Greedy decoding with a KV cache: the prompt through `prefill`, each new token through `decode`."""
    cache = KVCache(model, prompts.shape[0])
    token = cached_logits(model, prompts, cache, prefill)[:, -1].argmax(-1, keepdim=True)
    generated = [token]
    for _ in range(steps - 1):
        token = cached_logits(model, token, cache, decode)[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    return torch.cat(generated, dim=1)


# Serving a ragged batch: prompts cut to different lengths, PAGE_SIZE-token pages allocated from a shuffled
# free list as each request's cache grows (a server's fragmented pool), SERVED_STEPS tokens each.
PAGE_SIZE = 4
SERVED_PROMPTS = 64
SERVED_STEPS = 5


def serve(
    model: GPT, prompts: list[torch.Tensor], steps: int, prefill: Attention, decode: Attention, page_size: int | None
) -> torch.Tensor:
    """Greedy decoding of a batch of prompts of different lengths, as a server batches requests: each
    prompt prefilled alone through `prefill`, then every step one decode call for the whole batch, each
    request against its own cache length (cache_lens). With `page_size`, the caches are pages of a shared
    pool handed out as tokens arrive, read through a block table; without, one contiguous row per request.
    Returns the generated tokens (B, steps)."""
    attn = model.blocks[0].attn
    layers, batch, heads = len(model.blocks), len(prompts), attn.heads
    head_dim = model.embed.embedding_dim // heads
    lens = [len(p) for p in prompts]
    longest = max(lens) + steps
    if page_size is None:
        k_store = torch.zeros(layers, batch, heads, longest, head_dim)
    else:
        pages = sum(-(-(n + steps) // page_size) for n in lens)
        free = torch.randperm(pages, generator=torch.Generator().manual_seed(0)).tolist()
        table = torch.full((batch, -(-longest // page_size)), -1, dtype=torch.int32)
        k_store = torch.zeros(layers, pages, page_size, heads, head_dim)
    v_store = torch.zeros_like(k_store)

    def write(layer: int, b: int, at: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Request b's keys and values (H, n, D) at positions at.., taking a free page where one is full."""
        if page_size is None:
            k_store[layer, b, :, at : at + k.shape[1]] = k
            v_store[layer, b, :, at : at + k.shape[1]] = v
            return
        for i in range(k.shape[1]):
            slot, position = divmod(at + i, page_size)
            if table[b, slot] < 0:
                table[b, slot] = free.pop()
            k_store[layer, table[b, slot], position] = k[:, i]
            v_store[layer, table[b, slot], position] = v[:, i]

    def layer_step(layer: int, block: Block, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = block.norm1(x)
        q, k, v = block.attn.project(h, h)  # (B, H, 1, D)
        for b in range(batch):
            write(layer, b, int(lengths[b]) - 1, k[b], v[b])
        paged = {} if page_size is None else {"block_table": table}
        y = decode(q.contiguous(), k_store[layer], v_store[layer], causal=False, cache_lens=lengths, **paged)
        x = x + block.attn.merge(y)
        return x + block.mlp(block.norm2(x))

    tokens = []
    for b, prompt in enumerate(prompts):  # prefill: each prompt alone, its keys into its cache
        x = model.embed(prompt[None]) + model.position[: len(prompt)]
        for layer, block in enumerate(model.blocks):
            h = block.norm1(x)
            q, k, v = block.attn.project(h, h)
            write(layer, b, 0, k[0], v[0])
            x = x + block.attn.merge(prefill(q.contiguous(), k.contiguous(), v.contiguous(), causal=True))
            x = x + block.mlp(block.norm2(x))
        tokens.append(model.head(model.norm(x))[:, -1].argmax(-1))
    token = torch.cat(tokens)[:, None]  # (B, 1)
    generated = [token]
    lengths = torch.tensor(lens, dtype=torch.int32)
    for _ in range(steps - 1):
        lengths = lengths + 1
        x = model.embed(token) + model.position[lengths.long() - 1][:, None]
        for layer, block in enumerate(model.blocks):
            x = layer_step(layer, block, x, lengths)
        token = model.head(model.norm(x))[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
    return torch.cat(generated, dim=1)


def served(model: GPT, tokens: torch.Tensor, at: int, prefill: Attention, decode: Attention) -> dict:
    """A ragged batch served through a paged cache against the same batch in contiguous caches: the
    tokens must agree. A decode implementation that takes no paged or ragged cache says why."""
    from harness import registry
    from harness.shapes import Params

    paged = Params(batch=SERVED_PROMPTS, seq_len=1, seq_len_kv=at + SERVED_STEPS, page_size=PAGE_SIZE, ragged=True)
    ok, why = registry.get(DECODE, decode.name).available_for(paged)
    if not ok:
        return {"paged_serving": f"not run: {why}"}
    g = torch.Generator().manual_seed(13)
    cuts = torch.randint(0, 12, (SERVED_PROMPTS,), generator=g).tolist()  # prompts of 30 ... 41 tokens
    prompts = [tokens[i, : at - cut] for i, cut in enumerate(cuts)]
    started = time.perf_counter()
    through_pages = serve(model, prompts, SERVED_STEPS, prefill, decode, PAGE_SIZE)
    seconds = time.perf_counter() - started
    contiguous = serve(model, prompts, SERVED_STEPS, prefill, decode, None)
    return {
        "paged_serving": f"{SERVED_PROMPTS} prompts of {min(len(p) for p in prompts)}-{max(len(p) for p in prompts)} "
        f"tokens, {SERVED_STEPS} generated each, pages of {PAGE_SIZE}",
        "paged_agreement": float((through_pages == contiguous).float().mean()),
        "paged_tokens_per_s": through_pages.numel() / seconds,
    }


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention, decode = Attention(VARIANT), Attention(DECODE)
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
        start = time.perf_counter()
        generated = generate(model, tokens[:, :at], 2, attention, decode)
        generation_s = time.perf_counter() - start
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
            generated.flatten(),  # both generated tokens: agreement covers the decode step too
            len(tokens),
            extra={
                "dialogue_perplexity": ppl_all,
                "generated_tokens_per_s": generated.numel() / generation_s,
                **served(model, tokens, at, attention, decode),
            },
        )

    attention.use("naive")
    decode.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    decode.use(implementation)
    return timed(evaluate), reference, info
