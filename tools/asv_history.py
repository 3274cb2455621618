"""Run asv over the last N commits of main, publish the site, and check it in headless chromium.

    python tools/asv_history.py [--commits 5] [--no-run]

Checks that every benchmark's graph page renders a plot (flot's canvas in the live DOM, served on
127.0.0.1 the way `asv preview` serves it), saves a screenshot of one graph to docs/asv-graph.png,
and prints the figures: commits, benchmarks, wall time per step.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "results" / "asv" / "html"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def step(name: str, *cmd: str) -> float:
    start = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    took = time.perf_counter() - start
    print(f"  {name}: {took:.1f} s", flush=True)
    return took


# asv's published page loads jQuery, flot and friends from CDNs. For a site that works offline (and
# on this network-less machine) the same releases are taken from the npm registry and linked locally.
JSDELIVR = "https://cdn.jsdelivr.net/npm/"
VENDOR = {
    "jquery@3.3.1": {"https://code.jquery.com/jquery-3.3.1.min.js": "package/dist/jquery.min.js"},
    "flot@0.8.3": {
        f"https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot{part}.min.js": f"package/jquery.flot{part}.js"
        for part in ("", ".time", ".selection", ".categories")
    },
    "flot-orderbars@1.0.0": {
        JSDELIVR + "flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": "package/js/jquery.flot.orderBars.js"
    },
    "stupid-table-plugin@1.1.3": {
        "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": "package/stupidtable.min.js"
    },
    "blueimp-md5@2.19.0": {
        "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": "package/js/md5.min.js"
    },
    "bootstrap@3.1.1": {
        "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": "package/dist/js/bootstrap.min.js",
        "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": "package/dist/css/bootstrap.min.css",
    },
}


def vendor(html_dir: Path) -> None:
    """Replace the CDN links of asv's index.html by local copies from the npm registry."""
    import tarfile

    target = html_dir / "vendor"
    target.mkdir(exist_ok=True)
    index = html_dir / "index.html"
    page = index.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for spec, files in VENDOR.items():
            packed = (
                subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            with tarfile.open(Path(tmp) / packed) as archive:
                for url, member in files.items():
                    local = target / Path(member).name
                    local.write_bytes(archive.extractfile(member).read())
                    page = page.replace(url, f"vendor/{local.name}")
    # The CDN tags pin their files by SRI hash; the npm copies are the same releases but not always the
    # same bytes (flot's npm package ships unminified files), so local tags drop the pin.
    page = re.sub(r'(<(?:script|link)[^>]*"vendor/[^"]+"[^>]*?)\s+integrity="[^"]*"', r"\1", page)
    index.write_text(page)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def render(browser: str, url: str, profile: Path, screenshot: Path | None = None) -> str:
    args = [
        browser,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        "--window-size=1400,900",
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--no-run", action="store_true", help="only publish and check existing results")
    args = parser.parse_args()
    times = {}
    subprocess.run(["asv", "machine", "--yes"], cwd=ROOT, check=True, capture_output=True)
    if not args.no_run:
        times["asv run --quick"] = step("run", "asv", "run", "--quick", "--show-stderr", f"HEAD~{args.commits}..HEAD")
    times["asv publish"] = step("publish", "asv", "publish")
    vendor(HTML)
    index = json.loads((HTML / "index.json").read_text())
    benchmarks = sorted(index["benchmarks"])
    commits = (
        subprocess.run(["git", "log", "--format=%h %s", f"-{args.commits}"], cwd=ROOT, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found; install Debian's chromium to check the site", file=sys.stderr)
        return 1
    server, port = serve(HTML)
    missing = []
    with tempfile.TemporaryDirectory() as profile:
        for name in benchmarks:
            dom = render(browser, f"http://127.0.0.1:{port}/#{name}", Path(profile))
            if "flot-base" not in dom:
                missing.append(name)
        shot = ROOT / "docs" / "asv-graph.png"
        shot.parent.mkdir(exist_ok=True)
        render(browser, f"http://127.0.0.1:{port}/#kernels.multi_head.track_tflops", Path(profile), shot)
    server.shutdown()
    print(f"commits: {len(commits)}")
    for line in commits:
        print(f"  {line}")
    points = 0
    for b in benchmarks:
        grid = index["benchmarks"][b].get("params") or [[]]
        size = 1
        for axis in grid:
            size *= max(1, len(axis))
        points += size
    print(f"benchmarks: {len(benchmarks)} ({points} parameter points)")
    for what, took in times.items():
        print(f"{what}: {took:.1f} s")
    print(f"graph pages rendering a plot: {len(benchmarks) - len(missing)}/{len(benchmarks)}")
    for name in missing:
        print(f"  no plot: {name}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
