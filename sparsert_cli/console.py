"""One console for output, one for errors, one way to fail, one way to make a table."""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Rich cuts everything to 80 columns when the output is not a terminal (CI logs, pipes, files):
# there, tables get room to print whole lines unless $COLUMNS says otherwise.
PIPE_WIDTH = 200


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None     # Rich's own choice: the terminal's width or $COLUMNS
    return PIPE_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def abort_line(message: str, code: int = 2) -> None:
    """A user error: one red line on stderr (`sparsert: ...`), then exit with `code`."""
    first = message.strip().splitlines()[0] if message.strip() else "error"
    err_console.print(f"[bold red]sparsert:[/] {escape(first)}", markup=True, highlight=False,
                      soft_wrap=True)
    sys.exit(code)


def table(title: str, columns: list[str], rows: list[list], justify: dict | None = None) -> Table:
    out = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        out.add_column(col, justify=(justify or {}).get(col, "right" if col[:1].islower()
                                                         else "left"))
    for row in rows:
        out.add_row(*[str(cell) for cell in row])
    return out


def print_json(doc) -> None:
    """Machine-readable output: plain JSON on stdout, no Rich markup."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
