"""The on-disk kernel cache: a miss compiles and stores, a hit compiles nothing, the key follows
everything that decides the machine code, and damaged entries are detected, removed and rebuilt."""

from __future__ import annotations

import json

import pytest

from sparsert_cli import build as B
from sparsert_cli.build import build_all, build_kernel, make_plan
from sparsert_cli.cache import KernelCache, default_root
from sparsert_cli.compile import Compiled, Resources
from sparsert_cli.patterns import uniform_weights
from sparsert_cli.plan import PlanParams
from sparsert_cli.problems import Problem

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _plan(seed=0, width=40):
    problem = Problem("g", "gemm", 12, 20, height=1, width=width)
    return make_plan(problem, uniform_weights(problem.weight_shape, 0.7, seed),
                     PlanParams(rows_per_group=4))


@pytest.fixture
def no_compiler(monkeypatch):
    """Any compile after this point fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled although the cache should have served the kernel")

    monkeypatch.setattr(B, "_compile", refuse)


def test_default_root_follows_the_environment(isolated_cache):
    assert default_root() == isolated_cache
    assert KernelCache().root == isolated_cache


def test_miss_then_hit_compiles_once(tmp_path, monkeypatch):
    cache = KernelCache(tmp_path / "c")
    plan = _plan()
    first, _ = build_kernel(plan, "ptx", "sm_90", cache)
    assert not first.cached
    assert (cache.hits, cache.misses) == (0, 1)
    calls = []
    monkeypatch.setattr(B, "_compile", lambda *args: calls.append(args))
    second, source = build_kernel(plan, "ptx", "sm_90", cache, keep_source=True)
    assert calls == [], "compiled on a cache hit"
    assert second.cached
    assert second.cubin == first.cubin and second.key == first.key
    assert second.resources == first.resources and second.entry == plan.entry
    assert second.source_bytes == first.source_bytes > 0
    assert plan.entry in source                  # keep_source re-emits on a hit
    assert (cache.hits, cache.misses) == (1, 1)


def test_an_entry_stored_by_another_cache_object_is_served_as_is(tmp_path, no_compiler):
    root = tmp_path / "c"
    plan = _plan()
    cache = KernelCache(root)
    key = B._key(plan, "ptx", "sm_90")
    cache.put(key, Compiled(b"\x7fELF fake cubin", "log", 1.5,
                            {plan.entry: Resources(registers=42)}), {"source_bytes": 7})
    build, _ = build_kernel(plan, "ptx", "sm_90", KernelCache(root))
    assert build.cached and build.cubin == b"\x7fELF fake cubin"
    assert build.resources.registers == 42 and build.compile_seconds == 1.5


def test_key_changes_with_arch_emitter_and_plan():
    plan = _plan()
    keys = {B._key(plan, "ptx", "sm_90"), B._key(plan, "ptx", "sm_80"),
            B._key(plan, "cuda", "sm_90"), B._key(_plan(seed=1), "ptx", "sm_90"),
            B._key(_plan(width=41), "ptx", "sm_90")}
    assert len(keys) == 5
    assert B._key(plan, "ptx", "sm_90") == B._key(_plan(), "ptx", "sm_90")


def test_other_arch_or_emitter_misses(tmp_path):
    cache = KernelCache(tmp_path / "c")
    plan = _plan()
    build_kernel(plan, "ptx", "sm_90", cache)
    other_arch, _ = build_kernel(plan, "ptx", "sm_80", cache)
    other_emitter, _ = build_kernel(plan, "cuda", "sm_90", cache)
    assert not other_arch.cached and not other_emitter.cached
    assert (cache.hits, cache.misses) == (0, 3)
    assert len(list(cache.root.rglob("kernel.cubin"))) == 3


def _entry_dir(cache, key):
    return cache.root / key[:2] / key


def _filled(tmp_path):
    cache = KernelCache(tmp_path / "c")
    plan = _plan()
    build, _ = build_kernel(plan, "ptx", "sm_90", cache)
    return cache, plan, build, _entry_dir(cache, build.key)


def _truncate_cubin(entry):
    cubin = entry / "kernel.cubin"
    cubin.write_bytes(cubin.read_bytes()[:100])


def _flip_cubin_byte(entry):
    cubin = entry / "kernel.cubin"
    data = bytearray(cubin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cubin.write_bytes(bytes(data))


def _meta_edit(change):
    def apply(entry):
        meta = json.loads((entry / "meta.json").read_text())
        change(meta)
        (entry / "meta.json").write_text(json.dumps(meta))
    return apply


DAMAGE = {
    "truncated_cubin": _truncate_cubin,
    "flipped_cubin_byte": _flip_cubin_byte,
    "missing_cubin": lambda e: (e / "kernel.cubin").unlink(),
    "missing_meta": lambda e: (e / "meta.json").unlink(),
    "truncated_meta": lambda e: (e / "meta.json").write_text(
        (e / "meta.json").read_text()[:40]),
    "empty_meta": lambda e: (e / "meta.json").write_text(""),
    "meta_not_an_object": lambda e: (e / "meta.json").write_text("[1, 2, 3]"),
    "meta_wrong_hash": _meta_edit(lambda m: m.update(cubin_sha256="0" * 64)),
    "meta_missing_resources": _meta_edit(lambda m: m.pop("resources")),
    "meta_bad_resource_field": _meta_edit(
        lambda m: m.update(resources={"e": {"registers": 1, "bogus": 2}})),
    "meta_bad_seconds": _meta_edit(lambda m: m.update(compile_seconds="soon")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_detected_rebuilt_and_counted(tmp_path, damage):
    cache, plan, first, entry = _filled(tmp_path)
    DAMAGE[damage](entry)
    fresh = KernelCache(cache.root)
    rebuilt, _ = build_kernel(plan, "ptx", "sm_90", fresh)
    assert not rebuilt.cached
    assert rebuilt.cubin == first.cubin
    assert fresh.rebuilt == 1 and fresh.misses == 1 and fresh.hits == 0
    again = KernelCache(cache.root)
    hit, _ = build_kernel(plan, "ptx", "sm_90", again)
    assert hit.cached and hit.cubin == first.cubin and again.rebuilt == 0


def test_meta_with_resources_of_wrong_type_is_rebuilt(tmp_path):
    cache, plan, first, entry = _filled(tmp_path)
    _meta_edit(lambda m: m.update(resources=[]))(entry)
    fresh = KernelCache(cache.root)
    rebuilt, _ = build_kernel(plan, "ptx", "sm_90", fresh)
    assert not rebuilt.cached and fresh.rebuilt == 1


def test_put_leaves_no_temporary_directories(tmp_path):
    cache, _, build, entry = _filled(tmp_path)
    leftovers = [p for p in cache.root.rglob(".tmp-*")]
    assert leftovers == []
    assert sorted(p.name for p in entry.iterdir()) == ["kernel.cubin", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["extra"]["entry"] == build.entry


def test_build_all_serves_hits_in_process_and_compiles_the_rest(tmp_path):
    cache = KernelCache(tmp_path / "c")
    plans = [_plan(seed=s) for s in range(3)]
    build_kernel(plans[0], "ptx", "sm_90", cache)
    done = []
    results = build_all(plans, "ptx", "sm_90", cache, jobs=1,
                        on_done=lambda i, b, s: done.append(i))
    assert sorted(done) == [0, 1, 2]
    assert [r.cached for r in results] == [True, False, False]
    assert all(r.cubin[:4] == b"\x7fELF" for r in results)
    assert [r.entry for r in results] == [p.entry for p in plans]


def test_build_all_reports_a_failure_in_place(tmp_path, monkeypatch):
    plans = [_plan(seed=0), _plan(seed=1)]
    real_emit = B.emit
    monkeypatch.setattr(B, "emit", lambda plan, emitter, arch: (
        "broken" if plan is plans[1] else real_emit(plan, emitter, arch)))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    results = build_all(plans, "ptx", "sm_90", None, jobs=1)
    assert results[0].cubin[:4] == b"\x7fELF"
    assert isinstance(results[1], Exception) and "nvJitLink" in str(results[1])


def test_clear_removes_everything(tmp_path):
    cache, *_ = _filled(tmp_path)
    cache.clear()
    assert not cache.root.exists()
