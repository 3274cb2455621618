"""`python -m harness VERB ...`: the verbs of DESIGN.md's CLI section.

Exit codes: 0 success; 1 a regression, or --strict saw a failed or inaccurate case; 2 bad input.
Bad input never shows a traceback: every InputError becomes one message on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from harness.errors import InputError

console = Console()
err_console = Console(stderr=True)


def cmd_list(args: argparse.Namespace) -> int:
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
        table.add_row(name, *row, summaries.get(name, ""))
    console.print(table)
    for number, why in enumerate(reasons, 1):
        console.print(f"({number}) {why}", highlight=False)
    for plugin, why in registry.load_errors().items():
        err_console.print(f"[yellow]plugin {plugin!r} failed to load: {why}[/yellow]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("list", help="the variant x implementation matrix with availability")
    p.add_argument("--variant", help="only this variant")
    p.set_defaults(func=cmd_list)
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
