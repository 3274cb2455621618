"""An implementation whose sliding window is off by one (it sees one key too few behind each query):
the kind of bug a windowed kernel ships with. The accuracy rule must catch it (tests/test_masks.py)."""

from __future__ import annotations

from harness import register
from harness.variants import DOT_PRODUCT_VARIANTS
from implementations.naive import attend


@register("wrong_window", variants=DOT_PRODUCT_VARIANTS, mods=("window",))
def wrong_window(q, k, v, *, causal=False, scale=None, mask=None, window=None):
    """naive with window - 1."""
    return attend(q, k, v, causal=causal, scale=scale, mask=mask, window=None if window is None else window - 1)
