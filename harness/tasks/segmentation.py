"""Image segmentation with the Attention U-Net gate: find the circles among squares and noise.

Generated 32x32 images hold one to three discs (the target) and one to three squares of the same
brightness (clutter), plus noise. A small U-Net gates its skip connections with the additive
attention gate from the registry; the same U-Net without gates is the baseline. Metrics: Dice
and IoU of the predicted masks.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.tasks.common import Attention, Evaluation, Metric, fit, timed, train_or_load
from harness.variants import GateWeights

VARIANT = "attention_gate"
SIZE = 32


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, masks = torch.zeros(n, 1, SIZE, SIZE), torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = torch.randint(5, SIZE - 5, (2,), generator=g).tolist()
            r = float(torch.randint(3, 6, (1,), generator=g))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            images[i, 0][disc], masks[i, 0][disc] = 1.0, 1.0
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            y, x = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
            side = int(torch.randint(4, 9, (1,), generator=g))
            images[i, 0, y : y + side, x : x + side] = 1.0
            masks[i, 0, y : y + side, x : x + side] = 0.0  # a square drawn over a disc hides it
    images += 0.3 * torch.randn(images.shape, generator=g)
    return images, masks


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Gate(nn.Module):
    """Attention U-Net's additive gate on a skip connection, computed by the registry kernel."""

    def __init__(self, attention: Attention, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.attention = attention
        self.w_g = nn.Parameter(torch.randn(inner, channels) / channels**0.5)
        self.w_x = nn.Parameter(torch.randn(inner, channels) / channels**0.5)
        self.b_g, self.b_x = nn.Parameter(torch.zeros(inner)), nn.Parameter(torch.zeros(inner))
        self.w_psi = nn.Parameter(torch.randn(1, inner) / inner**0.5)
        self.b_psi = nn.Parameter(torch.zeros(1))

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        weights = GateWeights(self.w_g, self.b_g, self.w_x, self.b_x, self.w_psi, self.b_psi)
        return self.attention(skip.contiguous(), gating.contiguous(), weights)


class UNet(nn.Module):
    """Two-level U-Net; with `attention`, both skip connections pass through a gate."""

    def __init__(self, attention: Attention | None, width: int = 16) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = conv(1, width), conv(width, 2 * width), conv(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), conv(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), conv(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)
        self.gate2 = Gate(attention, 2 * width) if attention else None
        self.gate1 = Gate(attention, width) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(nn.functional.max_pool2d(s1, 2))
        m = self.mid(nn.functional.max_pool2d(s2, 2))
        u2 = self.up2(m)
        s2 = self.gate2(s2, u2) if self.gate2 else s2
        d2 = self.dec2(torch.cat([s2, u2], 1))
        u1 = self.up1(d2)
        s1 = self.gate1(s1, u1) if self.gate1 else s1
        return self.out(self.dec1(torch.cat([s1, u1], 1)))


def dice_iou(pred: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    inter = (pred * mask).sum((1, 2, 3))
    total = pred.sum((1, 2, 3)) + mask.sum((1, 2, 3))
    union = total - inter
    return float((2 * inter / total.clamp_min(1)).mean()), float((inter / union.clamp_min(1)).mean())


def run(implementation: str, cache_dir=None) -> tuple[Evaluation, Evaluation, dict]:
    attention = Attention(VARIANT)
    train_set, test_set = make_data(2000, seed=41), make_data(400, seed=42)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    def train(model: nn.Module) -> dict:
        def batch(step: int):
            idx = torch.randint(0, len(train_set[0]), (32,), generator=torch.Generator().manual_seed(step))
            return train_set[0][idx], train_set[1][idx]

        return {"final_loss": fit(model, batch, loss, steps=250, lr=5e-3)}

    code = (make_data, UNet, Gate, conv, run)
    model, info = train_or_load("segmentation", lambda: UNet(attention), train, code, cache_dir)
    plain, plain_info = train_or_load("segmentation-nogate", lambda: UNet(None), train, code, cache_dir)
    with torch.inference_mode():
        base_dice, base_iou = dice_iou((plain(test_set[0]) > 0).float(), test_set[1])
    info["baseline_train_seconds"] = plain_info.get("train_seconds")

    def evaluate() -> Evaluation:
        pred = (model(test_set[0]) > 0).float()
        dice, iou = dice_iou(pred, test_set[1])
        return Evaluation(
            [
                Metric("dice", dice, base_dice, "U-Net without gates"),
                Metric("iou", iou, base_iou, "U-Net without gates"),
            ],
            pred.flatten(1),
            len(pred),
        )

    attention.use("naive")
    reference = timed(evaluate)
    attention.use(implementation)
    return timed(evaluate), reference, info
