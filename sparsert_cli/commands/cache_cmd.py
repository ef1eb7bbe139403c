"""`sparsert cache`: where the kernel cache lives and how big it is; clear it or shrink it."""

from __future__ import annotations

import click

from ..console import console
from ..errors import UserError


def human(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (1.5 KiB, 39.4 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


@click.command("cache")
@click.option("--clear", is_flag=True,
              help="Delete every cached kernel (only what the cache wrote; a directory that is "
                   "not a sparsert cache is refused).")
@click.option("--max-size", metavar="SIZE",
              help="Evict least recently used kernels until the cache holds at most SIZE "
                   "(e.g. 500M, 2G). $SPARSERT_CACHE_MAX_SIZE (default 4G) caps every store.")
def command(clear, max_size):
    """Show, clear or shrink the on-disk kernel cache ($SPARSERT_CACHE_DIR, else XDG cache)."""
    from ..cache import KernelCache, parse_size, scan

    if clear and max_size is not None:
        raise UserError("cache: give --clear or --max-size, not both")
    limit = parse_size(max_size) if max_size is not None else None
    cache = KernelCache()
    if clear:
        removed, freed, kept = cache.clear()
        console.print(f"cleared {cache.root}: removed {removed} kernels, {human(freed)}"
                      + (f"; kept {kept} paths the cache did not write" if kept else ""),
                      highlight=False, soft_wrap=True)
        return
    if limit is not None:
        removed, freed = cache.evict(limit)
        console.print(f"{cache.root}: evicted {removed} least recently used kernels, "
                      f"{human(freed)}", highlight=False, soft_wrap=True)
    found = scan(cache.root)
    note = "" if found.marked or not found.foreign else " (not a sparsert cache: holds other files)"
    console.print(f"{cache.root}: {len(found.entries)} kernels, {human(found.bytes)} "
                  f"(limit {human(cache.max_bytes)}){note}", highlight=False, soft_wrap=True)
