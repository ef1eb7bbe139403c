"""`sparsert cache`: where the kernel cache lives, how big it is; clear it."""

from __future__ import annotations

import click

from ..console import console


@click.command("cache")
@click.option("--clear", is_flag=True, help="Delete every cached kernel.")
def command(clear):
    """Show (or clear) the on-disk kernel cache ($SPARSERT_CACHE_DIR, else XDG cache)."""
    from ..cache import KernelCache

    cache = KernelCache()
    if clear:
        cache.clear()
        console.print(f"cleared {cache.root}")
        return
    files = [p for p in cache.root.rglob("kernel.cubin")] if cache.root.exists() else []
    size = sum(p.stat().st_size for p in files)
    console.print(f"{cache.root}: {len(files)} kernels, {size / 2**20:.1f} MiB")
