"""Printers: kernel IR -> source text, one module per target, each a rule table over the IR.

A printer has a name, a `VERSION` (changes whenever its text changes; it enters cache keys), the
precisions it can print, `print_source(ir, arch)` and `check_printed(ir, text)`, which parses the
text back into the IR and raises PrintedMismatch unless it equals `ir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from ..ir import KernelIR


class PrintedMismatch(AssertionError):
    """Printed source that does not say what its IR says: a printer bug."""


@dataclass(frozen=True)
class Printer:
    name: str
    version: str
    precisions: tuple[str, ...]
    suffix: str
    print_source: Callable[[KernelIR, str], str]
    check_printed: Callable[[KernelIR, str], None] | None


def printers() -> dict[str, Printer]:
    from . import cuda, ptx
    from .parse_ptx import check_printed

    return {"ptx": Printer("ptx", ptx.VERSION, ("fp32", "fp16", "fp16acc32"), ".ptx",
                           ptx.print_ptx, check_printed),
            "cuda": Printer("cuda", cuda.VERSION, cuda.PRECISIONS, ".cu",
                            cuda.print_cuda, None)}


def get_printer(name: str) -> Printer:
    table = printers()
    if name not in table:
        raise UserError(f"unknown emitter {name!r} (known: {', '.join(table)})")
    return table[name]
