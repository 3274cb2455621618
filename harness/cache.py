"""The one folder for what the harness learns about a machine: measured ceilings, tuned tiles, trained
task models. It belongs to the machine, not to whatever folder a program happens to run in, so
importing a kernel never writes into the current directory.

`HARNESS_CACHE_DIR` chooses it; by default it is the platform's user cache folder (platformdirs:
~/.cache/attention-harness on Linux).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HARNESS_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (not created here: writers create what they write)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("attention-harness", appauthor=False)


def ceilings_dir() -> Path:
    return cache_dir() / "ceilings"


def task_cache_dir() -> Path:
    return cache_dir() / "tasks"
