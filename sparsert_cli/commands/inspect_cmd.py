"""`sparsert inspect DIR`: a generated kernel's manifest and resource report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from ..console import console, print_json, table
from ..errors import UserError


REQUIRED = ("entry", "problem", "nnz", "density", "plan", "epilogue", "grid", "block",
            "shared_bytes", "arguments", "arch", "emitter", "dtype", "registers",
            "spill_store_bytes", "spill_load_bytes", "stack_bytes", "cubin_bytes",
            "compile_seconds", "pattern_hash")


def load_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise UserError(f"{directory}: no manifest.json (not a `sparsert gen` output directory)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: not a sparsert manifest (not a JSON object)")
    missing = [key for key in REQUIRED if key not in doc]
    if missing:
        raise UserError(f"{path}: not a complete sparsert manifest (missing "
                        f"{', '.join(repr(k) for k in missing[:4])})")
    return doc


def check_cubin(directory: Path, doc: dict) -> str:
    """The cubin the manifest names exists and matches its hash; else one line, exit 2."""
    name = doc.get("cubin", "kernel.cubin")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise UserError(f"{directory / 'manifest.json'}: 'cubin' must name a file in "
                        f"{directory}, got {name!r}")
    cubin = directory / name
    if not cubin.is_file():
        raise UserError(f"{cubin}: missing (the manifest names it as the kernel's cubin)")
    try:
        digest = hashlib.sha256(cubin.read_bytes()).hexdigest()
    except OSError as exc:
        raise UserError(f"{cubin}: cannot be read ({exc.strerror or exc})") from None
    if digest != doc.get("cubin_sha256"):
        raise UserError(f"{cubin}: does not match the manifest's cubin_sha256 (changed or "
                        f"damaged since `sparsert gen` wrote it)")
    return "ok"


def render(doc: dict, directory: Path) -> None:
    p = doc["problem"]
    shape = (f"{p['m']}x{p['k']} x N={p['n']}" if p["op"] == "gemm" else
             f"{p['op']} {p['batch']}x{p['in_channels']}x{p['height']}x{p['width']} -> "
             f"{p['m']} ch, {p['out_height']}x{p['out_width']} (stride {p['stride']}, "
             f"pad {p['padding']})")
    spills = doc["spill_store_bytes"] + doc["spill_load_bytes"]
    rows = [
        ["entry", doc["entry"]],
        ["directory", str(directory)],
        ["problem", shape],
        ["nonzeros", f"{doc['nnz']} ({doc['density']:.1%} dense)"],
        ["plan", f"{doc['plan']['name']}: {doc['plan']['row_groups']} row groups, "
                 f"{doc['plan']['loads']} loads"],
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
