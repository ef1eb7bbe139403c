"""The on-disk kernel cache: a miss compiles and stores, a hit compiles nothing, the key follows
everything that decides the machine code, and damaged entries are detected, removed and rebuilt."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cli_helpers import run_main
from sparsert_cli import build as B
from sparsert_cli import cache as C
from sparsert_cli.build import build_all, build_kernel, make_plan
from sparsert_cli.cache import MARKER, KernelCache, default_root, parse_size
from sparsert_cli.commands.cache_cmd import human
from sparsert_cli.compile import Compiled, Resources
from sparsert_cli.patterns import uniform_weights
from sparsert_cli.families.immediate import PlanParams
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
    "meta_nan_seconds": _meta_edit(lambda m: m.update(compile_seconds=float("nan"))),
    "meta_log_not_text": _meta_edit(lambda m: m.update(log=17)),
    "meta_source_bytes_text": _meta_edit(lambda m: m["extra"].update(source_bytes="12k")),
    "meta_source_bytes_float": _meta_edit(lambda m: m["extra"].update(source_bytes=1.5)),
    "meta_source_bytes_negative": _meta_edit(lambda m: m["extra"].update(source_bytes=-3)),
    "meta_entry_not_text": _meta_edit(lambda m: m["extra"].update(entry=["k"])),
    "meta_extra_not_an_object": _meta_edit(lambda m: m.update(extra=[1])),
    "meta_registers_text": _meta_edit(
        lambda m: [r.update(registers="many") for r in m["resources"].values()]),
    "meta_registers_bool": _meta_edit(
        lambda m: [r.update(registers=True) for r in m["resources"].values()]),
    "meta_resource_not_an_object": _meta_edit(
        lambda m: m["resources"].update({k: 3 for k in m["resources"]})),
    "meta_deeply_nested": lambda e: (e / "meta.json").write_text("[" * 100000),
    "entry_replaced_by_a_file": lambda e: (shutil.rmtree(e), e.write_text("not an entry")),
    "entry_is_a_dangling_link": lambda e: (shutil.rmtree(e), e.symlink_to(e.parent / "gone")),
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


def test_a_prefix_directory_replaced_by_a_file_is_repaired(tmp_path):
    cache, plan, first, entry = _filled(tmp_path)
    shutil.rmtree(entry.parent)
    entry.parent.write_text("not a prefix")
    rebuilt, _ = build_kernel(plan, "ptx", "sm_90", KernelCache(cache.root))
    assert not rebuilt.cached and entry.is_dir()
    hit, _ = build_kernel(plan, "ptx", "sm_90", KernelCache(cache.root))
    assert hit.cached and hit.cubin == first.cubin


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
    real_render = B.render_source
    monkeypatch.setattr(B, "render_source", lambda ir, emitter, arch, *family: (
        "broken" if ir.entry == plans[1].entry else real_render(ir, emitter, arch, *family)))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    results = build_all(plans, "ptx", "sm_90", None, jobs=1)
    assert results[0].cubin[:4] == b"\x7fELF"
    assert isinstance(results[1], Exception) and "nvJitLink" in str(results[1])


def test_clear_removes_everything(tmp_path):
    cache, *_ = _filled(tmp_path)
    assert (cache.root / MARKER).is_file()
    assert cache.clear()[:1] == (1,)
    assert not cache.root.exists()


# ------------------------------------------------ clear: only what the cache wrote


def _project(root):
    """A directory a user might name in $SPARSERT_CACHE_DIR by mistake."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "model.py").write_text("print('precious')\n")
    (root / "README.md").write_text("# my project\n")
    (root / "ab").mkdir()                       # looks like a cache prefix, holds a user file
    (root / "ab" / "notes.txt").write_text("keep me\n")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("args", [["--clear"], ["--max-size", "0"]])
@pytest.mark.parametrize("spelling", ["plain", "dotdot", "relative_dotdot"])
def test_clear_refuses_a_directory_that_is_not_a_cache(tmp_path, monkeypatch, capsys, spelling,
                                                       args):
    project = tmp_path / "myproject"
    _project(project)
    (project / "sub").mkdir()
    key_shaped = project / "ab" / ("ab" + "cd" * 31)     # looks like an entry, is the user's
    key_shaped.mkdir()
    (key_shaped / "meta.json").write_text("{}")
    before = _tree(project)
    root = {"plain": str(project), "dotdot": str(project / "sub" / ".."),
            "relative_dotdot": ".."}[spelling]
    monkeypatch.chdir(project / "sub")
    monkeypatch.setenv("SPARSERT_CACHE_DIR", root)
    code, out, err = run_main(["cache", *args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "not a sparsert kernel cache" in err
    assert _tree(project) == before


def test_clear_of_a_missing_or_empty_directory_is_fine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "missing"))
    assert run_main(["cache", "--clear"], capsys)[:2] == (0, f"cleared {tmp_path / 'missing'}: "
                                                          f"removed 0 kernels, 0 B\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "empty"))
    assert run_main(["cache", "--clear"], capsys)[0] == 0
    assert (tmp_path / "empty").is_dir()        # not ours: left as it was


def test_clear_keeps_foreign_files_inside_a_cache_and_reports_counts(tmp_path, monkeypatch,
                                                                      capsys):
    cache, _, build, entry = _filled(tmp_path)
    size = sum(p.stat().st_size for p in entry.iterdir())
    (cache.root / "mine.txt").write_text("user file")
    (entry.parent / "other").mkdir()
    (entry.parent / "other" / "data.bin").write_bytes(b"x")
    stray = tempfile_in(entry.parent)           # a temporary dir a crashed put left behind
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache.root))
    code, out, _ = run_main(["cache", "--clear"], capsys)
    assert code == 0
    assert f"removed 1 kernels, {human(size)}; kept 2 paths" in out
    assert _tree(cache.root) == [MARKER, entry.parent.name, f"{entry.parent.name}/other",
                                 f"{entry.parent.name}/other/data.bin", "mine.txt"]
    assert not stray.exists()


def tempfile_in(parent):
    path = parent / ".tmp-crashed"
    path.mkdir()
    (path / "kernel.cubin").write_bytes(b"half")
    return path


def test_a_cache_without_marker_is_adopted_when_it_holds_only_entries(tmp_path):
    cache, plan, first, entry = _filled(tmp_path)
    (cache.root / MARKER).unlink()
    tempfile_in(entry.parent)
    KernelCache(cache.root).put("f" * 64, Compiled(b"x", "", 0.1, {}))
    assert (cache.root / MARKER).is_file()      # adopted by the next store
    (cache.root / MARKER).unlink()
    assert KernelCache(cache.root).clear()[0] == 2
    assert not cache.root.exists()


def test_a_cache_without_marker_holding_a_stray_file_is_refused(tmp_path, monkeypatch, capsys):
    cache, _, _, entry = _filled(tmp_path)
    (cache.root / MARKER).unlink()
    (entry / "notes.txt").write_text("mine")
    before = _tree(cache.root)
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache.root))
    code, _, err = run_main(["cache", "--clear"], capsys)
    assert code == 2 and "not a sparsert kernel cache" in err and _tree(cache.root) == before


def test_a_foreign_root_is_never_written_into(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "_warned", False, raising=False)
    project = tmp_path / "proj"
    before = _project(project)
    cache = KernelCache(project)
    plan = _plan()
    key = B._key(plan, "ptx", "sm_90")
    (project / key[:2] / key).mkdir(parents=True)   # damaged-looking, but not the cache's
    (project / key[:2] / key / "meta.json").write_text("mine")
    before = _tree(project)
    build, _ = build_kernel(plan, "ptx", "sm_90", cache)
    assert build.cubin[:4] == b"\x7fELF" and _tree(project) == before
    assert "not a sparsert kernel cache" in capsys.readouterr().err


# ------------------------------------------------ an unwritable cache compiles uncached


def _fail_writes_under(root, monkeypatch):
    """Writes below `root` fail as on a read-only file system (chmod does nothing for root)."""
    real_mkdir, real_mkdtemp = os.mkdir, C.tempfile.mkdtemp

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    monkeypatch.setattr(C.tempfile, "mkdtemp", lambda prefix=None, dir=None: refuse(dir) or
                        real_mkdtemp(prefix=prefix, dir=dir))


@pytest.fixture(params=["chmod", "failing_writes"])
def unwritable_cache(request, tmp_path, monkeypatch):
    """A cache root (with one entry and its marker) that cannot take new entries."""
    monkeypatch.setattr(C, "_warned", False, raising=False)
    cache, plan, _, _ = _filled(tmp_path)
    if request.param == "chmod":
        for path in [cache.root, *cache.root.iterdir()]:
            path.chmod(0o555)
        request.addfinalizer(lambda: [p.chmod(0o755) for p in [cache.root,
                                                               *cache.root.iterdir()]])
        if os.access(cache.root, os.W_OK):
            pytest.skip("running as root: chmod does not make a directory read-only")
    else:
        _fail_writes_under(cache.root, monkeypatch)
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache.root))
    return cache.root, plan


def test_an_unwritable_cache_compiles_uncached_with_one_warning(unwritable_cache, capsys):
    root, plan = unwritable_cache
    before = _tree(root)
    plans = [plan, _plan(seed=1), _plan(seed=2)]
    results = build_all(plans, "ptx", "sm_90", KernelCache(root), jobs=1)
    assert all(r.cubin[:4] == b"\x7fELF" for r in results), results
    assert [r.cached for r in results] == [True, False, False]     # hits are still served
    single, _ = build_kernel(_plan(seed=3), "ptx", "sm_90", KernelCache(root))
    assert not single.cached
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "compiling without the cache" in err
    assert _tree(root) == before


def test_a_put_that_fails_midway_warns_once_and_never_raises(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "_warned", False, raising=False)
    cache = KernelCache(tmp_path / "c")
    assert cache.usable()

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.Path, "write_bytes", full)
    for key in ("a" * 64, "b" * 64):
        cache.put(key, Compiled(b"x", "", 0.1, {}))
    assert capsys.readouterr().err.count("No space left on device") == 1
    assert not list(cache.root.rglob("kernel.cubin")) and not list(cache.root.rglob(".tmp-*"))


def test_bench_with_a_read_only_cache_fails_no_case(unwritable_cache, repo, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = run_main(["bench", str(repo / "configs" / "ci.yaml"), "--problems",
                             "ci_gemm_odd", "--sparsity", "0.9", "--jobs", "1", "--out",
                             str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["failures"] == []
    assert err.count("compiling without the cache") == 1


# ------------------------------------------------ size limit and LRU eviction


def _fake_entries(root, count, size=1000):
    cache = KernelCache(root)
    keys = [f"{i:02x}" * 32 for i in range(count)]
    for age, key in enumerate(keys):
        cache.put(key, Compiled(bytes(size), "", 0.1, {}))
        os.utime(cache._dir(key), (1000 + age, 1000 + age))    # key 0 oldest
    return cache, keys


def test_evict_removes_least_recently_used_first(tmp_path):
    cache, keys = _fake_entries(tmp_path / "c", 4)
    assert cache.get(keys[0]) is not None                      # a hit makes it the newest
    entry_bytes = sum(p.stat().st_size for p in cache._dir(keys[0]).iterdir())
    removed, freed = cache.evict(2 * entry_bytes)
    assert (removed, freed) == (2, 2 * entry_bytes)
    assert [cache._dir(k).exists() for k in keys] == [True, False, False, True]


def test_put_keeps_the_cache_under_the_environment_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERT_CACHE_MAX_SIZE", "3k")
    cache, keys = _fake_entries(tmp_path / "c", 5)
    kept = [k for k in keys if cache._dir(k).exists()]
    assert kept and len(kept) < 5 and kept == keys[-len(kept):]
    assert sum(p.stat().st_size for p in cache.root.rglob("*") if p.is_file()
               and p.name != MARKER) <= 3 * 1024


def test_cache_command_max_size_evicts(tmp_path, monkeypatch, capsys):
    cache, keys = _fake_entries(tmp_path / "c", 4)
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache.root))
    code, out, _ = run_main(["cache", "--max-size", "2.5K"], capsys)
    assert code == 0 and "evicted 2 least recently used kernels" in out and "2 kernels" in out
    assert [cache._dir(k).exists() for k in keys] == [False, False, True, True]


@pytest.mark.parametrize("text, size", [("2G", 2 * 2**30), ("512m", 512 * 2**20), ("1.5KiB", 1536),
                                        ("4096", 4096), ("0", 0), ("3 MB", 3 * 2**20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_human_sizes():
    assert [human(n) for n in (0, 1023, 1536, 41 * 2**20 + 2**19, 5 * 2**40)] == [
        "0 B", "1023 B", "1.5 KiB", "41.5 MiB", "5120.0 GiB"]


@pytest.mark.parametrize("text", ["-1", "2X", "G", "", "1e3", "2000T", "nan", "inf"])
def test_bad_max_size_is_one_line_exit_2(text, capsys, isolated_cache):
    code, out, err = run_main(["cache", "--max-size", text], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--max-size" in err


def test_bad_max_size_in_the_environment_is_one_line_exit_2(monkeypatch, capsys, isolated_cache):
    monkeypatch.setenv("SPARSERT_CACHE_MAX_SIZE", "lots")
    code, _, err = run_main(["cache"], capsys)
    assert code == 2 and "$SPARSERT_CACHE_MAX_SIZE" in err


def test_cache_command_shows_root_count_and_size(tmp_path, monkeypatch, capsys):
    cache, _, _, entry = _filled(tmp_path)
    size = sum(p.stat().st_size for p in entry.iterdir())
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache.root))
    code, out, _ = run_main(["cache"], capsys)
    assert code == 0 and out.startswith(f"{cache.root}: 1 kernels, {human(size)} (limit 4.0 GiB)")
