"""`sparsert` command line: a thin click group; each command lives in sparsert_cli/commands/."""

from __future__ import annotations

import sys

import click

from . import __version__
from .console import abort_line, console, err_console
from .errors import CompileError, UserError


class _Group(click.Group):
    def list_commands(self, ctx):
        return ["bench", "gen", "tune", "tunedb", "compare", "problems", "inspect", "cache",
                "plot", "report", "model"]

    def get_command(self, ctx, name):
        from importlib import import_module

        modules = {"bench": "bench", "gen": "gen", "tune": "tune", "tunedb": "tunedb",
                   "compare": "compare", "problems": "problems", "inspect": "inspect_cmd",
                   "cache": "cache_cmd", "plot": "plot", "report": "report", "model": "model"}
        if name not in modules:
            return None
        return import_module(f".commands.{modules[name]}", __package__).command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sparsert")
@click.option("--debug", is_flag=True,
              help="Show full tracebacks for errors (anywhere on the command line).")
@click.pass_context
def group(ctx, debug):
    """Pattern-specialised GPU kernels for unstructured sparse weights (SparseRT, PACT 2020).

    \b
    sparsert bench configs/ci.yaml        compile, verify and (on a GPU) time a config
    sparsert gen --pattern w.npz --n 196  one kernel: source, cubin and manifest.json
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:    # click would raise the help as a usage error; print it as `--help` does
        click.echo(group.get_help(click.Context(group, info_name="sparsert")))
        sys.exit(0)
    debug = "--debug" in args
    if debug:       # a global flag, accepted anywhere on the line
        args = ["--debug"] + [a for a in args if a != "--debug"]
    try:
        group.main(args=args, prog_name="sparsert", standalone_mode=False)
    except click.exceptions.Abort:      # click's form of Ctrl-C (KeyboardInterrupt)
        err_console.print("interrupted")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # One line, like every other bad input: what is wrong and where.
        where = exc.ctx.command_path if exc.ctx else "sparsert"
        abort_line(f"{where}: {exc.format_message()}", 2)
    except click.ClickException as exc:
        abort_line(exc.format_message(), exc.exit_code)
    except UserError as exc:
        if debug:
            console.print_exception()
        abort_line(exc.message, exc.code)
    except CompileError as exc:   # generated code the compiler refused: a sparsert bug, exit 1
        if debug:
            console.print_exception()
        lines = str(exc).splitlines()
        where = f" (source saved at {exc.source_path})" if exc.source_path else ""
        abort_line(f"compile failed: {lines[0] if lines else exc}{where}", 1)
    except OSError as exc:
        if debug:
            console.print_exception()
        abort_line(f"{exc.filename or 'I/O'}: {exc.strerror or exc}", 2)
    except MemoryError:
        abort_line("out of memory (is the weight or the shape far larger than intended?)", 2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
