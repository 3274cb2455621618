"""Run the CLI on every file of tests/data/bad_suites and report exit codes, tracebacks and times.

python tools/hostile_inputs.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    files = sorted((ROOT / "tests" / "data" / "bad_suites").iterdir())
    clean, slowest = 0, (0.0, "")
    for path in files:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "harness", "run", str(path), "--out", "/nonexistent/never"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        took = time.perf_counter() - start
        ok = done.returncode == 2 and "Traceback" not in done.stderr and path.name in done.stderr
        clean += ok
        slowest = max(slowest, (took, path.name))
        first = done.stderr.strip().splitlines()[-1][:100] if done.stderr.strip() else ""
        print(f"{'ok ' if ok else 'BAD'} {took:5.2f} s  {path.name:34s} {first}")
    print(
        f"{clean}/{len(files)} exit 2 with a message naming the file and no traceback; slowest {slowest[0]:.2f} s "
        f"({slowest[1]})"
    )
    return 0 if clean == len(files) else 1


if __name__ == "__main__":
    raise SystemExit(main())
