"""README's Quick start is the contract with a fresh machine: two commands, and CI runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "Quick start must hold exactly one fenced code block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands_that_install_what_they_need():
    run, test = quick_start_commands()
    assert run.startswith("pip install") and "python -m harness run suites/self_attn.yaml" in run
    assert test.startswith("pip install") and "pytest" in test
    assert "[cpu" in run and "[cpu" in test  # the CPU torch wheel, never a CUDA build by default


def test_ci_runs_the_readme_test_command():
    _, test = quick_start_commands()
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_cpu_extra_pins_the_cpu_torch_wheel():
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
