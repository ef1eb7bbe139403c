"""`sparsert inspect DIR`: a generated kernel's manifest and resource report."""

from __future__ import annotations

from pathlib import Path

import click

from ..console import console, print_json, table
from ..errors import UserError
# The manifest and cubin checks live with the output directory's format (files.py), shared
# with Kernel.from_dir; kept importable from here.
from ..files import REQUIRED, check_cubin, read_manifest as load_manifest  # noqa: F401


def render(doc: dict, directory: Path) -> None:
    p = doc["problem"]
    shape = (f"{p['m']}x{p['k']} x N={p['n']}" if p["op"] == "gemm" else
             f"{p['op']} {p['batch']}x{p['in_channels']}x{p['height']}x{p['width']} -> "
             f"{p['m']} ch, {p['out_height']}x{p['out_width']} (stride {p['stride']}, "
             f"pad {p['padding']})")
    spills = doc["spill_store_bytes"] + doc["spill_load_bytes"]
    plan = doc["plan"]
    size = (f"{plan['row_groups']} row groups, {plan['loads']} loads" if "row_groups" in plan
            else f"{plan['workers']} workers, {plan['rows']} rows, {plan['data_bytes']} B of data")
    rows = [
        ["entry", doc["entry"]],
        ["directory", str(directory)],
        ["problem", shape],
        ["nonzeros", f"{doc['nnz']} ({doc['density']:.1%} dense)"],
        ["plan", f"{doc.get('family', 'immediate')} {plan['name']}: {size}"],
        ["epilogue", ", ".join(f"{k}={v}" for k, v in doc["epilogue"].items())],
        ["launch", f"grid {tuple(doc['grid'])}, block {tuple(doc['block'])}, "
                   f"{doc['shared_bytes']} B shared"],
        ["arguments", ", ".join(f"{a['name']}{tuple(a['shape'])}" for a in doc["arguments"])],
        ["target", f"{doc['arch']} via {doc['emitter']}, {doc['dtype']}"],
        ["registers", doc["registers"]],
        ["spills", f"{spills} B ({doc['stack_bytes']} B stack frame)"],
        ["cubin", f"{doc['cubin_bytes']} B, {check_cubin(directory, doc)}"],
        ["compile", f"{doc['compile_seconds']} s" + (" (cache hit)" if doc.get("cached") else "")],
        ["pattern hash", doc["pattern_hash"]],
    ]
    if isinstance(doc.get("verify_cpu"), dict):     # gen verifies before writing
        check = doc["verify_cpu"]
        rows.append(["CPU check", f"{'ok' if check.get('ok') else 'FAILED'}, max err "
                                  f"{check.get('max_err')}"])
    console.print(table(f"sparsert kernel {doc['entry']}", ["Field", "Value"], rows))


@click.command("inspect")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def command(directory, as_json):
    """Show a generated kernel's manifest and resource report."""
    directory = Path(directory)
    doc = load_manifest(directory)
    status = check_cubin(directory, doc)
    if as_json:
        print_json({**doc, "cubin_check": status})
        return
    try:
        render(doc, directory)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{directory / 'manifest.json'}: malformed manifest "
                        f"({type(exc).__name__}: {exc})") from None
