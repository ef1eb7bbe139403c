"""On-disk kernel cache: cubin + metadata, keyed by everything that decides the machine code.

Layout: <root>/<key[:2]>/<key>/{kernel.cubin, meta.json}. Entries are written to a temporary
directory and renamed into place, so a crash never leaves a half entry under its real name; an entry
whose cubin does not match the hash in its metadata (truncated, corrupted) is treated as a miss,
removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from .compile import Compiled, Resources

ENV_VAR = "SPARSERT_CACHE_DIR"


def default_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsert"


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class KernelCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> tuple[Compiled, dict] | None:
        """The cached compile result and its extra metadata, or None (miss or damaged entry)."""
        entry = self._dir(key)
        if not entry.exists():
            self.misses += 1
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            cubin = (entry / "kernel.cubin").read_bytes()
            if hashlib.sha256(cubin).hexdigest() != meta["cubin_sha256"]:
                raise ValueError("cubin hash mismatch")
            resources = {name: Resources(**vals) for name, vals in meta["resources"].items()}
            compiled = Compiled(cubin, meta.get("log", ""), float(meta["compile_seconds"]),
                                resources)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # damaged entry
            shutil.rmtree(entry, ignore_errors=True)
            self.misses += 1
            self.rebuilt += 1
            return None
        self.hits += 1
        return compiled, meta.get("extra", {})

    def put(self, key: str, compiled: Compiled, extra: dict | None = None) -> None:
        entry = self._dir(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cubin_sha256": hashlib.sha256(compiled.cubin).hexdigest(),
                "compile_seconds": compiled.seconds, "log": compiled.log,
                "resources": {n: asdict(r) for n, r in compiled.resources.items()},
                "extra": extra or {}}
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        try:
            (tmp / "kernel.cubin").write_bytes(compiled.cubin)
            (tmp / "meta.json").write_text(json.dumps(meta))
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not entry.exists():       # else a parallel worker stored the same key first
                raise

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
