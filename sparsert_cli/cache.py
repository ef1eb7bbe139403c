"""On-disk kernel cache: cubin + metadata, keyed by everything that decides the machine code.

Layout: <root>/.sparsert-cache (the marker that says the directory is ours) and
<root>/<key[:2]>/<key>/{kernel.cubin, meta.json}. Entries are written to a temporary directory
(<key[:2]>/.tmp-*) and renamed into place, so a crash never leaves a half entry under its real name.
An entry whose cubin does not match the hash in its metadata, whose metadata has a field of the
wrong type, or that is not a directory at all is a miss: removed and rebuilt.

The cache only ever deletes what it wrote: `clear` and eviction remove entry and temporary
directories, and refuse a root that holds anything else without the marker (a project directory
named by mistake in $SPARSERT_CACHE_DIR). An unwritable root never fails a kernel: the kernel is
compiled uncached, with one warning per process. Hits refresh an entry's mtime, and a `put` that
takes the cache past its size limit ($SPARSERT_CACHE_MAX_SIZE, default 4G) evicts the least
recently used entries.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .compile import Compiled, Resources
from .errors import UserError

ENV_VAR = "SPARSERT_CACHE_DIR"
SIZE_ENV_VAR = "SPARSERT_CACHE_MAX_SIZE"
DEFAULT_MAX_BYTES = 4 * 2**30
MAX_BYTES_LIMIT = 2**50                     # 1 PiB: anything larger is a typo
MARKER = ".sparsert-cache"
FORMAT = 1
ENTRY_FILES = frozenset({"kernel.cubin", "meta.json"})
TMP_PREFIX = ".tmp-"
# Fields of `extra` that callers read back, with their types: a wrong type is a damaged entry.
EXTRA_TYPES = {"entry": str, "source_bytes": int, "sparsert": str}
_HEX2 = re.compile(r"[0-9a-f]{2}")
_KEY = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)

_warned = False


def warn_once(message: str) -> None:
    """One warning per process on stderr (the cache degrades; it never fails a kernel)."""
    global _warned
    if not _warned:
        _warned = True
        from .console import err_console

        err_console.print(f"[yellow]sparsert: warning:[/] {message}", highlight=False,
                          soft_wrap=True)


def default_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsert"


def parse_size(text: str, what: str = "--max-size") -> int:
    """'2G', '512M', '100k', '1.5GiB', '4096' -> bytes (powers of 1024); UserError otherwise."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise UserError(f"{what}: expected a size such as 512M or 2G, got {text!r}")
    size = float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " ")
    if not 0 <= size <= MAX_BYTES_LIMIT:
        raise UserError(f"{what}: {text} is out of range (0 to 1024T)")
    return int(size)


def default_max_bytes() -> int:
    text = os.environ.get(SIZE_ENV_VAR)
    return parse_size(text, f"${SIZE_ENV_VAR}") if text else DEFAULT_MAX_BYTES


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _remove(path: Path) -> None:
    """Delete an entry path, whatever it became (directory, regular file, symlink); never follow a
    link out of the cache. Errors are ignored: a leftover is retried on the next miss."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError:
        pass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode(meta, cubin: bytes) -> tuple[Compiled, dict]:
    """The compile result stored in `meta`; ValueError on any missing or wrong-typed field."""
    if not isinstance(meta, dict) or meta.get("cubin_sha256") != hashlib.sha256(cubin).hexdigest():
        raise ValueError("cubin hash mismatch")
    seconds, log = meta.get("compile_seconds"), meta.get("log", "")
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            and math.isfinite(seconds) and seconds >= 0) or not isinstance(log, str):
        raise ValueError("bad compile_seconds or log")
    raw, extra = meta.get("resources"), meta.get("extra", {})
    if not isinstance(raw, dict) or not isinstance(extra, dict):
        raise ValueError("resources or extra is not an object")
    names = {f.name for f in fields(Resources)}
    resources = {}
    for entry, values in raw.items():
        if (not isinstance(values, dict) or not set(values) <= names
                or not all(_is_int(v) and v >= 0 for v in values.values())):
            raise ValueError(f"bad resources for {entry}")
        resources[entry] = Resources(**values)
    for name, kind in EXTRA_TYPES.items():
        value = extra.get(name, 0 if kind is int else "")
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ValueError(f"bad extra.{name}")
    return Compiled(cubin, log, float(seconds), resources), extra


@dataclass
class Scan:
    """What a cache root holds: entries (path, bytes, mtime), temporary dirs (path, bytes),
    prefix directories, and paths the cache did not write."""

    entries: list
    temps: list
    prefixes: list
    foreign: list
    marked: bool

    @property
    def bytes(self) -> int:
        """Bytes held by entries and temporary directories."""
        return sum(e[1] for e in self.entries) + sum(size for _, size in self.temps)


def _entry_size(path: Path) -> int | None:
    """Bytes of a directory holding only entry files (regular, not links); None otherwise."""
    total = 0
    for child in os.scandir(path):
        if child.name not in ENTRY_FILES or not child.is_file(follow_symlinks=False):
            return None
        total += child.stat(follow_symlinks=False).st_size
    return total


def scan(root: Path) -> Scan:
    out = Scan([], [], [], [], False)
    if not root.is_dir():
        return out
    for top in os.scandir(root):
        path = Path(top.path)
        is_dir = top.is_dir(follow_symlinks=False)
        if top.name == MARKER and top.is_file(follow_symlinks=False):
            out.marked = True
        elif top.name.startswith(TMP_PREFIX) and is_dir and _entry_size(path) is not None:
            out.temps.append((path, _entry_size(path)))     # a writability probe left behind
        elif _HEX2.fullmatch(top.name) and is_dir:
            out.prefixes.append(path)
            for child in os.scandir(path):
                sub = Path(child.path)
                is_dir = child.is_dir(follow_symlinks=False)
                size = _entry_size(sub) if is_dir else None
                if size is not None and _KEY.fullmatch(child.name) and child.name[:2] == top.name:
                    out.entries.append((sub, size, child.stat(follow_symlinks=False).st_mtime))
                elif size is not None and child.name.startswith(TMP_PREFIX):
                    out.temps.append((sub, size))
                else:
                    out.foreign.append(sub)
        else:
            out.foreign.append(path)
    return out


class KernelCache:
    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root else default_root()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self._usable: bool | None = None

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> tuple[Compiled, dict] | None:
        """The cached compile result and its extra metadata, or None (miss or damaged entry)."""
        entry = self._dir(key)
        try:
            if not os.path.lexists(entry):
                self.misses += 1
                return None
            cubin = (entry / "kernel.cubin").read_bytes()
            hit = _decode(json.loads((entry / "meta.json").read_text()), cubin)
        except (OSError, ValueError, RecursionError):  # damaged entry (or an unreadable root)
            if (self.root / MARKER).is_file():      # never delete inside a foreign directory
                _remove(entry)
            self.misses += 1
            self.rebuilt += 1
            return None
        try:
            os.utime(entry)                         # recently used: evicted last
        except OSError:
            pass
        self.hits += 1
        return hit

    def _refuse_foreign(self, found: Scan, action: str) -> None:
        if found.foreign and not found.marked:
            raise UserError(f"{self.root}: not a sparsert kernel cache (no {MARKER} marker and it "
                            f"holds {found.foreign[0].name!r}, which the cache did not write); "
                            f"{action} nothing")

    def usable(self) -> bool:
        """Whether puts can work: the root is (or becomes) a marked cache and is writable. The
        first failure warns once; kernels are then compiled uncached."""
        if self._usable is None:
            self._usable = self._claim()
        return self._usable

    def _claim(self) -> bool:
        marker = self.root / MARKER
        try:
            if not marker.is_file():
                if self.root.exists() and scan(self.root).foreign:
                    warn_once(f"{self.root} is not a sparsert kernel cache (it holds other files);"
                              f" compiling without the cache")
                    return False
                self.root.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"sparsert_kernel_cache": FORMAT}) + "\n")
            os.rmdir(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))   # writable?
            return True
        except OSError as exc:
            warn_once(f"kernel cache {self.root} is not writable ({exc.strerror or exc}); "
                      f"compiling without the cache")
            return False

    def put(self, key: str, compiled: Compiled, extra: dict | None = None) -> None:
        """Store a compile result; on an unusable cache, warn once and store nothing."""
        if not self.usable():
            return
        entry = self._dir(key)
        meta = {"cubin_sha256": hashlib.sha256(compiled.cubin).hexdigest(),
                "compile_seconds": compiled.seconds, "log": compiled.log,
                "resources": {n: asdict(r) for n, r in compiled.resources.items()},
                "extra": extra or {}}
        tmp = None
        try:
            if os.path.lexists(entry.parent) and not entry.parent.is_dir():
                _remove(entry.parent)               # a file where a prefix directory belongs
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=entry.parent))
            (tmp / "kernel.cubin").write_bytes(compiled.cubin)
            (tmp / "meta.json").write_text(json.dumps(meta))
            _remove(entry)
            os.replace(tmp, entry)
        except OSError as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if not entry.is_dir():     # else a parallel worker stored the same key first
                self._usable = False
                warn_once(f"cannot write to kernel cache {self.root} ({exc.strerror or exc}); "
                          f"compiling without the cache")
            return
        try:
            self.evict(self.max_bytes)
        except (OSError, UserError):                # a concurrent clear; nothing to keep
            pass

    def evict(self, max_bytes: int) -> tuple[int, int]:
        """Remove least recently used entries until the cache holds at most `max_bytes`.
        Returns (entries removed, bytes removed)."""
        found = scan(self.root)
        self._refuse_foreign(found, "evicted")
        total, removed, freed = found.bytes, 0, 0
        for path, size, _ in sorted(found.entries, key=lambda e: e[2]):
            if total - freed <= max_bytes:
                break
            _remove(path)
            removed, freed = removed + 1, freed + size
        return removed, freed

    def clear(self) -> tuple[int, int, int]:
        """Remove every entry and temporary directory the cache wrote, then the prefix
        directories left empty, its marker and the root once nothing else is in it. Refuses
        (UserError) a root that holds anything else without the marker. Returns (entries
        removed, bytes removed, paths kept because the cache did not write them)."""
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory, so not a sparsert kernel cache; "
                            f"removed nothing")
        found = scan(self.root)
        self._refuse_foreign(found, "removed")
        for path, *_ in found.entries + found.temps:
            _remove(path)
        for path in found.prefixes:
            try:
                path.rmdir()                        # only when now empty
            except OSError:
                pass
        ours = found.marked or found.entries or found.temps or found.prefixes
        if ours and not any(p.name != MARKER for p in self.root.iterdir()):
            (self.root / MARKER).unlink(missing_ok=True)
            try:
                self.root.rmdir()                   # empty by now (a symlink root stays)
            except OSError:
                pass
        return len(found.entries), found.bytes, len(found.foreign)
