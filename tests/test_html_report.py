"""`sparsert report`: one self-contained offline HTML file, checked by its structure and by
rendering it in a real headless Chromium (skipped, with the reason, where there is none)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from cli_helpers import run_main
from plot_docs import models_doc, sweep_doc, tune_doc, write

pytest.importorskip("matplotlib")

PAPER20 = "results/h100/paper20.json"
FIGURES = ["layers", "roofline", "speedup"] * 2 + ["tune", "model"]   # of `full_report`
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class Page(HTMLParser):
    """Every start tag with its attributes, the text inside <style>/<script>, and table heads."""

    def __init__(self):
        super().__init__()
        self.tags, self.inline, self.heads, self._stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), list(self._stack)))
        if tag not in ("meta", "br", "img", "input", "link", "path", "use", "rect", "line",
                       "circle", "polyline", "polygon", "ellipse", "stop"):
            self._stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), list(self._stack)))

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        if self._stack and self._stack[-1] in ("style", "script"):
            self.inline.append(data)
        if self._stack and self._stack[-1] == "th":
            self.heads.append(data)


def _report(capsys, tmp_path, *paths):
    out = tmp_path / "out" / "report.html"
    code, stdout, err = run_main(["report", *map(str, paths), "-o", str(out)], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    return out


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """paper20 (GPU bench), a synthetic sweep, tune and models file: every figure kind."""
    from sparsert_cli.html_report import write as write_report

    tmp = tmp_path_factory.mktemp("report")
    paths = [PAPER20, write(tmp, sweep_doc(), "sweep.json"), write(tmp, tune_doc(), "tune.json"),
             write(tmp, models_doc(), "models.json")]
    return write_report(paths, tmp / "report.html")


def test_report_is_self_contained(full_report):
    text = full_report.read_text()
    page = Page()
    page.feed(text)
    tags = [t for t, _, _ in page.tags]
    for tag, attrs, _ in page.tags:
        assert tag not in ("link", "iframe", "object", "embed", "img", "base"), tag
        assert not (tag == "script" and "src" in attrs), "external script"
        for key in ("src", "href", "xlink:href", "action", "srcset"):
            value = attrs.get(key)
            assert value is None or value.startswith("#") or value.startswith("data:"), (
                tag, key, value)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)|@import", "".join(page.inline))
    assert "default-src 'none'" in text                          # the CSP forbids fetching
    assert tags.count("script") == 1 and tags.count("figure") == len(FIGURES)


def test_every_figure_is_an_inline_svg_with_a_size(full_report):
    page = Page()
    page.feed(full_report.read_text())
    figures = [a["data-figure"] for t, a, _ in page.tags if t == "figure"]
    assert figures == FIGURES
    outer = [a for t, a, stack in page.tags if t == "svg" and "svg" not in stack]
    assert len(outer) == len(FIGURES)
    for attrs in outer:
        assert re.fullmatch(r"[\d.]+pt", attrs["width"]) and re.fullmatch(r"[\d.]+pt",
                                                                           attrs["height"])
        assert len(attrs["viewbox"].split()) == 4            # html.parser lowercases names


def test_tables_and_metadata(full_report):
    text = full_report.read_text()
    page = Page()
    page.feed(text)
    heads = set(page.heads)
    assert {"sparsert us", "p20-p80", "cuBLAS fp32 us", "x cuSPARSE", "% floor",
            "winner us", "share"} <= heads
    doc = json.loads(open(PAPER20).read())
    for value in (doc["gpu"]["name"], doc["gpu"]["nvml_driver"], doc["git_commit"],
                  doc["timestamp"], doc["config"]["hash"], "SM 1980 / 1980 MHz"):
        assert value in text
    first = doc["cases"][0]
    assert f"<td>{first['sparsert']['median_us']:.2f}</td>" in text
    assert "Break-even sparsity" in text


@pytest.mark.parametrize("make, words", [
    (lambda t: write(t, {"kind": "scale", "schema": 2, "runs": [{}]}, "s.json"),
     "holds scale results"),
    (lambda t: write(t, {**models_doc(), "models": [{"name": "m"}]}, "m.json"),
     "lacks the fields"),
    (lambda t: t / "missing.json", "no such results file"),
])
def test_bad_input_writes_nothing(capsys, tmp_path, make, words):
    path = make(tmp_path)
    out = tmp_path / "r" / "report.html"
    code, _, err = run_main(["report", str(path), PAPER20, "-o", str(out)], capsys)
    assert code == 2 and words in err and str(path) in err and len(err.splitlines()) == 1
    assert not out.exists() and not out.parent.exists()


def test_output_that_is_a_directory(capsys, tmp_path):
    code, _, err = run_main(["report", PAPER20, "-o", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err


def test_cpu_only_results_still_report(capsys, tmp_path):
    doc = sweep_doc("bench")
    for c in doc["cases"]:
        c["verify_gpu"] = None
    out = _report(capsys, tmp_path, write(tmp_path, doc, "cpu.json"))
    assert "No case was timed on a GPU" in out.read_text()
    assert "<figure" not in out.read_text()


# ---- a real browser ---------------------------------------------------------------------------

def _browser():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.skip("no Chromium binary (apt-get install chromium, or scripts/ensure-chromium)")
    return found


def _chromium(browser, page, *args) -> tuple[str, list[str]]:
    """(stdout, console lines) of one headless Chromium run on a file."""
    proc = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", "--no-first-run",
                           "--user-data-dir=" + str(page.parent / "chromium-profile"),
                           *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_console_errors_are_detected(tmp_path):
    """The browser check can fail: a page with a script error or a blocked fetch is caught."""
    browser = _browser()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><meta http-equiv="Content-Security-Policy" '
                    'content="default-src \'none\'; script-src \'unsafe-inline\'">'
                    '<script>undefinedFunction();</script>'
                    '<style>@import url("https://example.invalid/x.css");</style>')
    _, console = _chromium(browser, page, "--dump-dom")
    assert any("Uncaught ReferenceError" in line for line in console), console
    assert any("Content Security Policy" in line for line in console), console


def test_report_renders_in_headless_chromium(full_report):
    browser = _browser()
    dom, console = _chromium(browser, full_report, "--dump-dom", "--window-size=1280,2000")
    assert not console, console                               # no errors, no blocked fetches
    sizes = re.search(r'data-sizes="([^"]*)"', dom)
    assert sizes, "the inline size check did not run"
    figures = json.loads(sizes.group(1).replace("&quot;", '"'))
    assert [f[0] for f in figures] == FIGURES
    assert all(w > 100 and h > 100 for _, w, h in figures), figures
    assert "sparsert report" in dom and dom.count("<table") >= 8

    shot = full_report.parent / "shot.png"
    _chromium(browser, full_report, f"--screenshot={shot}", "--window-size=1280,2000",
              "--hide-scrollbars")
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert struct.unpack(">II", head[16:24]) == (1280, 2000)


def test_missing_matplotlib_is_one_line(capsys, tmp_path, monkeypatch):
    import sparsert_cli.plots as plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "sparsert_cli.plots.draw", raising=False)
    monkeypatch.delattr(plots, "draw", raising=False)
    out = tmp_path / "report.html"
    code, _, err = run_main(["report", PAPER20, "-o", str(out)], capsys)
    assert code == 2 and "pip install 'sparsert[plot]'" in err and not out.exists()
