"""Benchmark attention implementations: time, peak memory and accuracy per implementation, device and shape.

`python -m harness VERB ...` with VERB one of list, run, report, compare, gate, profile, ceilings, llm
(`python -m harness VERB --help` for each; docs/architecture.md for how they fit together).

Exit codes: 0 success; 1 a regression, or --strict saw a failed or inaccurate case; 2 bad input.
Bad input never shows a traceback: every InputError becomes one message on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from rich.console import Console

from harness.errors import InputError

# Wide enough for the tables when output goes to a file or CI log rather than a terminal.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)


def cmd_list(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from harness import registry
    from harness.variants import VARIANTS

    variants = [args.variant] if args.variant else list(VARIANTS)
    impls = [impl for variant in variants for impl in registry.implementations(variant)]
    names = sorted({impl.name for impl in impls})
    cells = {(impl.name, impl.variant): impl for impl in impls}
    table = Table(title="variant x implementation on this machine", title_justify="left")
    table.add_column("implementation", style="bold", no_wrap=True)
    for variant in variants:
        table.add_column(variant, justify="center")
    table.add_column("summary")
    reasons: list[str] = []
    summaries: dict[str, str] = {}
    for name in names:
        row = []
        for variant in variants:
            impl = cells.get((name, variant))
            if impl is None:
                row.append("[dim]-[/dim]")
                continue
            summaries.setdefault(name, impl.summary + ("" if impl.exact else " (approximate)"))
            ok, why = impl.available()
            if ok:
                row.append("[green]yes[/green]")
            else:
                if why not in reasons:
                    reasons.append(why)
                row.append(f"[red]no ({reasons.index(why) + 1})[/red]")
        table.add_row(name, *row, escape(summaries.get(name, "")))
    console.print(table)
    for number, why in enumerate(reasons, 1):
        console.print(f"({number}) {escape(why)}", highlight=False)
    for plugin, why in registry.load_errors().items():
        err_console.print(f"[yellow]plugin {plugin!r} failed to load: {why}[/yellow]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from harness.console import RunProgress, summary_table
    from harness.executors import parse_options
    from harness.runner import run_suite
    from harness.suite import check_only, load_suite, quick_version

    if args.out and args.resume:
        raise InputError("--out and --resume exclude each other: --resume DIR writes into DIR")
    if args.executor_option and args.executor == "local":
        raise InputError("--executor-option applies to --executor submitit or ray, not to the local executor")
    suite = load_suite(args.suite)
    if args.only:
        check_only(suite, args.only)
    if args.quick:
        suite = quick_version(suite)
    result = run_suite(
        suite,
        args.out,
        resume=args.resume,
        only=args.only,
        progress=RunProgress(console),
        executor=args.executor,
        workers=args.workers,
        options=parse_options(args.executor_option),
    )
    console.print(summary_table(result.records))
    if result.worker_starts is not None:
        console.print(f"worker processes started: {result.worker_starts}", highlight=False)
    report = _write_report(result.out_dir)
    console.print(f"results: {result.out_dir}/" + (f"  report: {report}" if report else ""), highlight=False)
    if result.interrupted:
        err_console.print(f"interrupted; finished cases are kept. Continue with: --resume {result.out_dir}")
        return 130
    if args.strict and (result.failed or result.inaccurate):
        err_console.print(
            f"--strict: {len(result.failed)} failed and {len(result.inaccurate)} inaccurate cases", highlight=False
        )
        return 1
    return 0


def _write_report(run_dir) -> str | None:
    """The HTML report when the report package is present; a failure here never loses results."""
    try:
        from harness.report import write_report
    except ImportError:
        return None
    try:
        return str(write_report(run_dir))
    except Exception as exc:  # the measurements are on disk already; say what went wrong and go on
        err_console.print(f"[yellow]report not written: {type(exc).__name__}: {exc}[/yellow]")
        return None


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    path = write_report(args.run_dir)
    console.print(f"report: {path}", highlight=False)
    return 0


def _verdicts(comparisons, threshold: float, markdown_file: str | None, notes: list[str] | None = None) -> int:
    from harness.compare import markdown, table

    console.print(table(comparisons))
    regressions = [c for c in comparisons if c.regression]
    if markdown_file:
        from pathlib import Path

        Path(markdown_file).write_text(markdown(comparisons, threshold, environment=notes))
    if regressions:
        err_console.print(f"[red]{len(regressions)} regression(s)[/red] (threshold {threshold:.0%})", highlight=False)
        return 1
    console.print(f"no regression (threshold {threshold:.0%}, 95% confidence)", highlight=False)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import compare_runs, environment_differences
    from harness.results import read_environment, read_records

    comparisons = compare_runs(read_records(args.base), read_records(args.new), args.threshold)
    differences = environment_differences(read_environment(args.base), read_environment(args.new))
    if differences:
        err_console.print(
            "[yellow]the two runs were measured on different environments; read every verdict in that light:[/yellow]"
        )
        for line in differences:
            err_console.print(f"  {line}", highlight=False)
    return _verdicts(comparisons, args.threshold, args.markdown, differences)


def cmd_gate(args: argparse.Namespace) -> int:
    from harness.console import RunProgress
    from harness.gate import gate

    comparisons, out = gate(
        args.suite,
        args.base,
        args.head,
        threshold=args.threshold,
        rounds=args.rounds,
        out_dir=args.out,
        progress=RunProgress(console),
    )
    console.print(f"gate results: {out}/ (base/, head/, comparison.md)", highlight=False)
    return _verdicts(comparisons, args.threshold, args.markdown)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold must be a number such as 0.05, got {text!r}") from None
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"--threshold must be between 0 and 10 (0.05 = 5%), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.profile import PROFILE_JSON, profile_suite

    out = profile_suite(args.suite, args.case, args.out)
    import json

    for entry in json.loads((out / PROFILE_JSON).read_text()):
        if entry["status"] != "ok":
            console.print(f"skipped {entry['case_id']}: {entry['reason']}", highlight=False)
            continue
        table = Table(title=entry["case_id"], title_justify="left")
        for column in ("operator", "calls", "self CPU ms", "share"):
            table.add_column(column, justify="left" if column == "operator" else "right")
        for op in entry["top_operators"][:8]:
            table.add_row(op["name"], str(op["calls"]), f"{op['self_cpu_us'] / 1e3:.2f}", f"{op['self_cpu_share']:.0%}")
        console.print(table)
    console.print(f"traces: {out}/  (tensorboard --logdir {out}/tb ; chrome/*.json for Perfetto)", highlight=False)
    return 0


def cmd_ceilings(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.ceilings import ceilings_for, cross_check

    if not re.fullmatch(r"cpu|cuda|cuda:\d+", args.device):
        raise InputError(f"--device {args.device!r}: allowed values are cpu, cuda, cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: this machine has no CUDA device")
    ceilings, path = ceilings_for(args.device, args.threads, refresh=True)
    checked = cross_check(ceilings) if args.cross_check else {}
    table = Table(
        title=f"ceilings of {ceilings.machine} ({args.device}, {args.threads or 'default'} threads)",
        title_justify="left",
    )
    for column in ("what", "peak", "how it was measured", "torch.utils.benchmark"):
        table.add_column(column, justify="right" if column in ("peak", "torch.utils.benchmark") else "left")
    for dtype, flops in ceilings.flops.items():
        other = checked.get(f"matmul_{dtype}")
        table.add_row(
            f"matmul {dtype}",
            f"{flops / 1e9:,.1f} GFLOP/s",
            ceilings.method[f"matmul_{dtype}"],
            "" if other is None else f"{other / 1e9:,.1f} GFLOP/s",
        )
    other = checked.get("bandwidth")
    table.add_row(
        "memory bandwidth",
        f"{ceilings.bandwidth / 1e9:,.1f} GB/s",
        ceilings.method["bandwidth"],
        "" if other is None else f"{other / 1e9:,.1f} GB/s",
    )
    console.print(table)
    console.print(f"saved: {path} (runs use it for every case on this device and thread count)", highlight=False)
    from harness import registry

    # What implementations tune per machine is measured again with the ceilings, here, on this machine.
    for name, tune in registry.tuners(args.device).items():
        console.print(f"{name}: {tune(args.threads)}", highlight=False)
    return 0


def cmd_llm(args: argparse.Namespace) -> int:
    """Task llm on the user's own config: the same comparison and report as suites/llm.yaml."""
    from pathlib import Path

    from harness.console import RunProgress, llm_table
    from harness.runner import run_suite
    from harness.suite import check_only, parse_suite
    from harness.tasks.llm import load_config, unavailable_reason

    why = unavailable_reason()
    if why:
        raise InputError(f"llm: {why}")
    path = Path(args.config)
    if not (path / "config.json" if path.is_dir() else path).is_file():
        raise InputError(f"{args.config}: no such config file (a transformers config.json, or its folder)")
    try:
        load_config(str(path))
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise InputError(f"{args.config}: not a usable transformers config: {exc}") from None
    options = {"config": str(path.resolve()), "dtype": args.dtype}
    if args.prompt_len:
        options["prompt_len"] = args.prompt_len
    if args.new_tokens:
        options["new_tokens"] = args.new_tokens
    name = "llm-" + "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.stem)[:50]
    suite = parse_suite({"name": name, "tasks": ["llm"], "task_options": {"llm": options}}, f"llm --config {path}")
    if args.only:
        check_only(suite, args.only)
    result = run_suite(suite, args.out, only=args.only, progress=RunProgress(console))
    console.print(llm_table(result.records, name.removeprefix("llm-")))
    report = _write_report(result.out_dir)
    console.print(f"results: {result.out_dir}/" + (f"  report: {report}" if report else ""), highlight=False)
    return 130 if result.interrupted else 0


def _verdict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=_threshold, default=0.05, help="slow-down that counts (default 0.05 = 5%%)")
    p.add_argument("--markdown", metavar="FILE", help="also write a pull-request comment in Markdown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("list", help="the variant x implementation matrix with availability")
    p.add_argument("--variant", help="only this variant")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser("run", help="run a suite; results in results/<suite>-<UTC time>/")
    p.add_argument("suite", help="suite YAML file, e.g. suites/self_attn.yaml")
    p.add_argument("--out", help="run folder to write (default results/<suite>-<UTC timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue a run folder: run only the cases not recorded")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these implementations")
    p.add_argument("--quick", action="store_true", help="few sizes, short timing")
    p.add_argument("--strict", action="store_true", help="exit 1 if any case failed or was inaccurate")
    p.add_argument(
        "--executor",
        choices=("local", "submitit", "ray"),
        default="local",
        help="where cases run: here, one at a time (default), or spread over submitit jobs (SLURM or local) "
        "or Ray tasks (a local Ray instance, or --executor-option address=auto)",
    )
    p.add_argument("--workers", type=_positive, default=2, help="submitit jobs to spread the cases over (default 2)")
    p.add_argument(
        "--executor-option",
        action="append",
        metavar="KEY=VALUE",
        help="a submitit parameter (cluster=local, slurm_partition=gpu, timeout_min=120) or a Ray one "
        "(address, num_cpus, num_gpus); repeatable",
    )
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("report", help="(re)write plots and the HTML report of a run folder")
    p.add_argument("run_dir", help="a run folder, e.g. results/self_attn-20260101T000000Z")
    p.set_defaults(func=cmd_report)

    p = verbs.add_parser("compare", help="per-case verdicts between two run folders; exit 1 on a regression")
    p.add_argument("base", help="base run folder")
    p.add_argument("new", help="new run folder")
    _verdict_options(p)
    p.set_defaults(func=cmd_compare)

    p = verbs.add_parser("gate", help="interleaved A/B of two commits on a suite; exit 1 on a regression")
    p.add_argument("suite", help="suite YAML file, e.g. suites/ci.yaml")
    p.add_argument("--base", required=True, help="git ref of the base (e.g. origin/main)")
    p.add_argument("--head", help="git ref of the head (default: the working tree)")
    _verdict_options(p)
    p.add_argument("--rounds", type=int, default=15, help="interleaved A/B rounds per case (default 15, at least 6)")
    p.add_argument("--out", help="folder for base/ and head/ records (default results/gate-<suite>-<time>)")
    p.set_defaults(func=cmd_gate)

    p = verbs.add_parser("profile", help="torch.profiler traces (TensorBoard, Chrome/Perfetto) of chosen cases")
    p.add_argument("suite", help="suite YAML file")
    p.add_argument(
        "--case",
        action="append",
        metavar="CASE_ID",
        help="a case id to profile (repeatable; default: every case of the suite's --quick version)",
    )
    p.add_argument("--out", help="folder for traces and profile.json (a run folder puts them in its report)")
    p.set_defaults(func=cmd_profile)

    p = verbs.add_parser("ceilings", help="measure this machine's matmul and bandwidth ceilings (the roofline)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: torch's); suites use 2")
    p.add_argument(
        "--no-cross-check",
        dest="cross_check",
        action="store_false",
        help="skip timing the same GEMM and copy with torch.utils.benchmark beside them",
    )
    p.set_defaults(func=cmd_ceilings)

    p = verbs.add_parser("llm", help="every implementation inside a transformers model of your config, against eager")
    p.add_argument("--config", required=True, help="a transformers config.json (or its folder); random weights")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these implementations (names or patterns)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=_positive, default=None, help="prompt tokens (default 48)")
    p.add_argument("--new-tokens", type=_positive, default=None, help="greedy steps compared (default 8)")
    p.add_argument("--out", help="run folder (default results/llm-<config>-<time>)")
    p.set_defaults(func=cmd_llm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
