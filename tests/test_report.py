"""The HTML report and its plots: escaping, content, and a real headless-browser load."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.report import best_per_shape, write_report
from harness.results import RunFolder, new_record, read_records, to_frame

HOSTILE = '<script>alert("x")</script> & "quotes" \'single\'\nnew line ' + "long " * 200


def _record(impl: str, n: int, median: float, status: str = "ok", accurate: bool | None = True, reason: str = ""):
    params = {
        "batch": 1,
        "heads": 2,
        "seq_len": n,
        "seq_len_kv": None,
        "head_dim": 16,
        "dtype": "float32",
        "device": "cpu",
        "threads": 1,
        "causal": False,
    }
    fields = {"status": status, "reason": reason}
    if status == "ok":
        fields |= {
            "time_s": {
                "median": median,
                "iqr": median / 20,
                "min": median * 0.9,
                "mean": median,
                "n": 5,
                "samples": [median] * 5,
            },
            "tflops": 4 * 2 * n * n * 16 / median / 1e12,
            "tokens_per_s": n / median,
            "peak_memory_bytes": n * n * 8 if impl == "naive" else n * 64,
            "max_abs_err": 1e-7,
            "max_rel_err": 1e-7,
            "tolerance": 2e-7,
            "accurate": accurate,
        }
    return new_record("s", "multi_head", impl, f"multi_head/{impl}/{n}", params, **fields)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    out = tmp_path / "run"
    with RunFolder(out) as folder:
        folder.write_json("env.json", {"suite": "s", "torch": "2.13.0", "cpu": HOSTILE, "git_commit": "abc"})
        for n in (64, 128, 256):
            folder.append(_record("naive", n, 1e-3 * n / 64))
            folder.append(_record("fast", n, 2e-4 * n / 64))
            folder.append(_record("fastest_but_wrong", n, 1e-4, accurate=False, reason="max_abs_err 1 > tolerance"))
        folder.append(_record("crashy", 128, 0, status="crash", reason="worker died with SIGSEGV"))
        folder.append(_record(HOSTILE, 64, 0, status="error", reason=HOSTILE))
    return out


def test_best_per_shape_ignores_inaccurate_and_failed_cases(run_dir):
    from harness.results import read_records

    best = best_per_shape(to_frame(read_records(run_dir)))
    assert {row["best"] for row in best} == {"fast"}
    assert all(row["runner_up"] == "naive" and row["margin"] == pytest.approx(5.0) for row in best)


def test_report_escapes_every_string_from_records_and_env(run_dir):
    html = write_report(run_dir).read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the report's own sorting script


def test_report_is_self_contained_with_embedded_plots_and_failures(run_dir):
    html = write_report(run_dir).read_text()
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/]{1000,}', html)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert "worker died with SIGSEGV" in html and "inaccurate" in html
    assert (run_dir / "plots").is_dir() and any((run_dir / "plots").glob("*.png"))
    assert (run_dir / "results.csv").exists()


def test_report_of_a_folder_without_records_is_a_clear_error(tmp_path):
    from harness.errors import InputError

    with pytest.raises(InputError, match="no results.jsonl"):
        write_report(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_loads_in_headless_chromium_without_console_errors_and_plots_render(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium must be installed in CI (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed here (.ci/run installs it)")
    report = write_report(run_dir)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--window-size=1400,2600",
            f"--screenshot={shot}",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert shot.exists(), done.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # plots drawn, not a blank or text-only page
    # The plot area holds the implementations' colours (matplotlib's tab10 blue of `naive`).
    assert any(abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12 for _, (r, g, b) in colours)


@pytest.mark.slow
def test_cli_report_verb_writes_the_report(run_dir):
    done = subprocess.run(
        [os.sys.executable, "-m", "harness", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert (run_dir / "report.html").exists()
    json.loads((run_dir / "env.json").read_text())


def test_packed_documents_rank_with_their_setup_and_windows_without(tmp_path):
    """Documents change every batch, so a mask rebuilt per batch counts against each call; a window's does not."""
    out = tmp_path / "run"
    with RunFolder(out) as folder:
        for extra, name in (({"documents": 16}, "docs"), ({"window": 512}, "window")):
            for impl, median, setup in (("masked", 1.0e-3, 5e-3), ("skips", 2.0e-3, None)):
                record = _record(impl, 256, median).as_dict()
                record["params"] |= extra
                record["case_id"] += f"-{name}"
                if setup is not None:
                    record["setup_s"] = setup
                folder.append(record)
    best = {row["shape"]: row for row in best_per_shape(to_frame(read_records(out)))}
    docs = next(row for shape, row in best.items() if "documents=16" in shape)
    window = next(row for shape, row in best.items() if "window=512" in shape)
    assert docs["best"] == "skips" and docs["margin"] == pytest.approx(3.0)  # (1 + 5) ms against 2 ms
    assert window["best"] == "masked" and window["setup_s"] == pytest.approx(5e-3) and not window["setup_counted"]
    html = write_report(out).read_text()
    assert "Windows and documents" not in html  # one value per axis: nothing to draw against
    assert "<th>density</th>" in html and "<th>setup s</th>" in html


def test_decode_is_drawn_in_gb_per_s_against_the_page_size_under_the_copy_ceiling(tmp_path):
    from harness.report.plots import plot_modifiers

    out = tmp_path / "run"
    with RunFolder(out) as folder:
        for page in (None, 16, 256):
            for impl, gbps in (("memory_efficient", 7.0), ("naive", 2.0)):
                record = _record(impl, 1, 1e-3).as_dict()
                record["variant"] = "decode"
                record["params"] |= {"seq_len_kv": 4096, "page_size": page, "ragged": True}
                record["case_id"] = f"decode/{impl}/p{page}"
                record |= {
                    "gbps": gbps,
                    "roofline": {"bound": "memory", "fraction": 0.5, "peak_tflops": 1.0, "peak_gbps": 14.0},
                }
                folder.append(record)
    figures = plot_modifiers(to_frame(read_records(out)))
    assert [f.title.split(" · ")[0] for f in figures] == ["against page_size"]
    html = write_report(out).read_text()
    assert "against page_size" in html
