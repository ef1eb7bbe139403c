"""Run `sparsert ARGS` in-process as the console script does (shared by the CLI test modules)."""

from __future__ import annotations

from sparsert_cli.cli import main


def run_main(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `sparsert ARGS`."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
