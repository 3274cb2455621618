"""Attention Harness: which attention implementation to use, on this device, at these shapes."""

from harness.registry import Implementation, get, implementations, register

__version__ = "0.1.0"
__all__ = ["Implementation", "get", "implementations", "register", "__version__"]
