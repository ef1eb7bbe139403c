"""`sparsert report RESULTS.json... -o report.html`: one self-contained offline HTML file."""

from __future__ import annotations

import click

from ..console import console


@click.command("report")
@click.argument("paths", nargs=-1, required=True, metavar="RESULTS.json...")
@click.option("-o", "--out", default="report.html", show_default=True,
              help="The HTML file to write.")
@click.option("--title", default="sparsert report", show_default=True, help="Page title.")
def command(paths, out, title):
    """Figures (inline SVG), tables and run metadata of bench / sweep / tune / models results in
    one HTML file that needs no network (needs matplotlib: pip install 'sparsert[plot]')."""
    from ..html_report import write

    path = write(paths, out, title)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False,
                  soft_wrap=True)
