"""Where the shipped data lives, and checks on output paths made before any long work starts.

The shipped problems, configs and tuned-plan database are package data (sparsert_cli/data/), so
an installed wheel finds them wherever it runs; a checkout's top-level `problems` and `configs`
are symlinks to the same folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
PROBLEM_DIR = DATA_DIR / "problems"
CONFIG_DIR = DATA_DIR / "configs"
SHIPPED_TUNED = CONFIG_DIR / "tuned.json"
LOCAL_TUNED = Path("configs") / "tuned.json"   # relative to the working directory


def config_path(path: str | Path) -> Path:
    """A config file: the path itself when it exists; else a bare name (`ci`) or a README-style
    `configs/NAME.yaml` means the shipped config of that name."""
    path = Path(path)
    if path.exists():
        return path
    name = None
    if not path.suffix and len(path.parts) == 1:
        name = path.name
    elif path.suffix == ".yaml" and path.parent == Path("configs"):
        name = path.stem
    if name is None:
        return path
    shipped = CONFIG_DIR / f"{name}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"{path}: no such config file (shipped configs: {names})")
    return shipped


def tuned_db_path(path: str | Path | None = None, write: bool = False) -> Path:
    """The tuned-plan database: `path` if given; else ./configs/tuned.json when the working
    directory has one (a checkout, or a project that keeps its own); else, for reading only,
    the copy shipped inside the package (never written: it may sit in a read-only install)."""
    if path is not None:
        return Path(path)
    if LOCAL_TUNED.is_file():
        return LOCAL_TUNED
    if write:
        raise UserError(f"no {LOCAL_TUNED} in the current directory to update: give --db FILE "
                        f"(the database shipped inside the package is only read)")
    return SHIPPED_TUNED


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def can_create_in(directory: Path) -> bool:
    """Whether a file can be created in `directory` (a temporary one, removed at once): the
    permission bits do not say so for root, nor on a read-only or pseudo file system."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sparsert-probe-"):
            return True
    except OSError:
        return False


def check_output(path: Path, flag: str, directory: bool = False) -> None:
    """Fail now, before compiling, if `path` cannot be written: a name too long, a parent that
    is a file or not writable, a directory where a file goes (or a file where a directory goes).
    Leaves nothing behind (writability is tried with a temporary file, removed at once)."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise UserError(f"{path}: is {kind}; {flag} takes a {'directory' if directory else 'file'}"
                        f" name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"{path}: cannot be written ({ancestor} is a file, not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK) or not can_create_in(ancestor):
        raise UserError(f"{path}: cannot be written ({ancestor} is not a writable directory)")
    limit = _name_max(ancestor)
    long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise UserError(f"{path}: the name {long[:40]}... is longer than the file system allows "
                        f"({limit} bytes)")
