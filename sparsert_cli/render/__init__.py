"""Printers: kernel IR -> source text, one module per target, each a rule table over the IR.

A printer has a name, a `VERSION` (changes whenever its text changes; it enters cache keys), the
precisions it can print, `print_source(ir, arch)`, `to_cubin(source, arch, threads)` (its compiler
route) and `check_printed(ir, text)`, which parses the text back into the IR and raises
PrintedMismatch unless it equals `ir` (None where no parser exists yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..compile import Compiled, cpp_to_cubin, ptx_to_cubin
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
    to_cubin: Callable[[str, str, int], Compiled]
    check_printed: Callable[[KernelIR, str], None] | None


def _ptx_cubin(source: str, arch: str, threads: int) -> Compiled:
    # ptxas splits one module's functions across `threads` cores
    return ptx_to_cubin(source, arch, (f"-Xptxas=--split-compile={threads}",) if threads > 1
                        else ())


def printers() -> dict[str, Printer]:
    from . import cuda, parse_cuda, parse_ptx, ptx

    return {"ptx": Printer("ptx", ptx.VERSION, ptx.PRECISIONS, ".ptx",
                           ptx.print_ptx, _ptx_cubin, parse_ptx.check_printed),
            "cuda": Printer("cuda", cuda.VERSION, cuda.PRECISIONS, ".cu", cuda.print_cuda,
                            lambda source, arch, threads: cpp_to_cubin(source, arch),
                            parse_cuda.check_printed)}


def stream_printer() -> Printer:
    """The streamed family's printer (CUDA C++ loop + tables; see render/stream.py)."""
    from . import stream

    return Printer("stream", stream.VERSION, stream.PRECISIONS, ".cu", stream.print_stream,
                   stream.to_cubin, stream.check_printed)


def printer_for(emitter: str, family: str = "immediate") -> Printer:
    """The printer that prints `family`'s kernels: the streamed family has its own (its loop is
    CUDA C++ whatever the emitter); the immediate family's is the emitter's."""
    return stream_printer() if family == "streamed" else get_printer(emitter)


def get_printer(name: str) -> Printer:
    table = printers()
    if name not in table:
        raise UserError(f"unknown emitter {name!r} (known: {', '.join(table)})")
    return table[name]
