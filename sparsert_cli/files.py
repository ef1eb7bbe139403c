"""A kernel's output directory (what `sparsert gen` and Kernel.save() write, what `inspect` and
Kernel.from_dir() read): writing it without touching anything else, reading its manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

REQUIRED = ("entry", "problem", "nnz", "density", "plan", "epilogue", "grid", "block",
            "shared_bytes", "arguments", "arch", "emitter", "dtype", "registers",
            "spill_store_bytes", "spill_load_bytes", "stack_bytes", "cubin_bytes",
            "compile_seconds", "pattern_hash")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
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


def write_output_dir(out: Path, files: dict[str, bytes], allowed: set[str]) -> None:
    """Write the outputs without ever touching anything else: a new directory is filled in a
    temporary sibling and renamed into place; an existing one may hold only files named in
    `allowed` (a previous output), which are replaced one by one (each atomically) and removed
    when this output does not have them."""
    try:
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{out}: exists and is not a directory; choose another -o")
            foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
            if foreign:
                raise UserError(f"{out}: holds files that are not a sparsert output "
                                f"({', '.join(foreign[:3])}); choose another -o")
            for name, data in files.items():
                tmp = out / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, out / name)
            for stale in allowed - set(files):       # e.g. kernel.cu after --emit ptx
                (out / stale).unlink(missing_ok=True)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            for name, data in files.items():
                (tmp_dir / name).write_bytes(data)
            tmp_dir.chmod(0o755)
            os.replace(tmp_dir, out)
        except OSError:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    except OSError as exc:
        raise UserError(f"{out}: cannot write output: {exc.strerror or exc}") from None


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
