"""The Attention U-Net additive gate, three ways: out = x · σ(ψ(relu(W_g·g + W_x·x))).

All three are exact; they differ in how many full-size intermediates they keep alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.registry import register
from harness.variants import GateWeights

# Pixels per tile for `chunked`: bounds the (F_int, pixels) intermediate to a few MiB.
PIXEL_TILE = 4096


def _conv1x1(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(t, weight[:, :, None, None], bias)


@register("naive", variants=("attention_gate",))
def gate_naive(x: torch.Tensor, g: torch.Tensor, params: GateWeights) -> torch.Tensor:
    """As in the paper: separate 1x1 convolutions for g, x and ψ, each a full-size feature map."""
    theta = _conv1x1(g, params.w_g, params.b_g) + _conv1x1(x, params.w_x, params.b_x)
    alpha = torch.sigmoid(_conv1x1(torch.relu(theta), params.w_psi, params.b_psi))
    return x * alpha


def _gate_pixels(x: torch.Tensor, g: torch.Tensor, p: GateWeights) -> torch.Tensor:
    """The gate on (B, C, P) pixel columns with one intermediate buffer and in-place activations."""
    pre = torch.baddbmm(p.b_g[:, None], p.w_g.expand(x.shape[0], -1, -1), g)
    pre.baddbmm_(p.w_x.expand(x.shape[0], -1, -1), x).add_(p.b_x[:, None]).relu_()
    alpha = torch.baddbmm(p.b_psi[:, None], p.w_psi.expand(x.shape[0], -1, -1), pre).sigmoid_()
    return x * alpha


@register("fused", variants=("attention_gate",))
def gate_fused(x: torch.Tensor, g: torch.Tensor, params: GateWeights) -> torch.Tensor:
    """Both projections accumulate into one buffer (bias fused into the GEMM), activations in place."""
    b, c, h, w = x.shape
    return _gate_pixels(x.reshape(b, c, h * w), g.reshape(b, g.shape[1], h * w), params).view(b, c, h, w)


@register("chunked", variants=("attention_gate",))
def gate_chunked(x: torch.Tensor, g: torch.Tensor, params: GateWeights) -> torch.Tensor:
    """Spatial tiles of PIXEL_TILE pixels: intermediate memory bounded whatever the image size."""
    b, c, h, w = x.shape
    xs, gs = x.reshape(b, c, h * w), g.reshape(b, g.shape[1], h * w)
    out = torch.empty_like(xs)
    for start in range(0, h * w, PIXEL_TILE):
        cols = slice(start, start + PIXEL_TILE)
        out[:, :, cols] = _gate_pixels(xs[:, :, cols], gs[:, :, cols], params)
    return out.view(b, c, h, w)
