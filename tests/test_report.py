"""vistrain.viz.report: one self-contained HTML page per run, checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vistrain.viz.plots import confusion_matrix_png, reliability_diagram_png
from vistrain.viz.report import write_report

NAMES = ["cat", "dog", "<script>alert(1)</script>"]  # a hostile class name must come out escaped
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> Path:
    return confusion_matrix_png(np.array([[3, 1, 0], [0, 4, 0], [1, 0, 2]]), NAMES, path)


def make_run(root: Path, with_summary: bool = True) -> Path:
    """A finished run with two folds, eval results for two splits, calibration and a few PNGs."""
    run = root / "demo-run"
    (run / "plots").mkdir(parents=True)
    (run / "config.yaml").write_text("project:\n  name: demo & <friends>\ntrain:\n  epochs: 2\n")
    (run / "run.json").write_text(json.dumps({"run_id": "demo-run", "status": "success",
                                              "started": "2026-01-01T10:00:00"}))
    if with_summary:
        folds = [{"fold": k, "best_epoch": 2, "epochs_run": 2, "stopped_early": False, "time_s": 3.5,
                  "best": {"valid_loss": 0.4 + k / 10, "macro_f1": 0.8 + k / 10, "accuracy": 0.85}} for k in (0, 1)]
        (run / "summary.json").write_text(json.dumps({
            "run_id": "demo-run", "monitor": "macro_f1", "folds": folds,
            "mean": {"valid_loss": 0.45, "macro_f1": 0.85, "accuracy": 0.85},
            "std": {"valid_loss": 0.0707, "macro_f1": 0.0707, "accuracy": 0.0},
            "oof": {"macro_f1": 0.8512, "accuracy": 0.8634}, "timings": {"total_s": 12.0},
            "environment": {"python": "3.11.9", "torch": "2.4.0", "device": "cpu (2 threads)"}}))
    _png(run / "plots" / "fold0_curves.png")
    _png(run / "plots" / "oof_confusion_matrix.png")
    for split, f1 in (("oof", 0.5), ("val", 0.99)):
        (run / "eval" / split).mkdir(parents=True)
        (run / "eval" / split / "per_class.csv").write_text(
            "class,precision,recall,f1,support,accuracy\n"
            + "".join(f"{n},0.9,0.8,{f1},10,0.8\n" for n in NAMES))
        (run / "eval" / split / "metrics.json").write_text(json.dumps({"macro_f1": 0.77, "accuracy": 0.81}))
        _png(run / "eval" / split / "confusion_matrix.png")
    (run / "calibration.json").write_text(json.dumps({"temperature": 1.7321, "nll_before": 0.61, "nll_after": 0.48,
                                                      "ece_before": 0.0912, "ece_after": 0.0213}))
    bins = [{"lo": i / 5, "hi": (i + 1) / 5, "count": 4, "confidence": i / 5 + 0.1, "accuracy": i / 5}
            for i in range(5)]
    reliability_diagram_png({"before": bins, "after": bins}, run / "calibration_reliability.png", 0.09, 0.02)
    return run


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rendering the PNGs is the slow part: do it once, and give each test its own copy."""
    return make_run(tmp_path_factory.mktemp("template"))


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / template.name))


def all_pngs(run: Path) -> list[Path]:
    return [*run.glob("plots/*.png"), *run.glob("eval/*/*.png"), *run.glob("*.png")]


def test_report_is_self_contained_and_complete(run: Path) -> None:
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == page.count("<img") == len(all_pngs(run)) == 5
    for src in sources:  # every image inlined, and a real PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    # Nothing fetched from outside: no external src/href, no stylesheet or script file.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<link" not in page and "<script src" not in page
    assert "Content-Security-Policy" in page


def test_report_content(run: Path) -> None:
    page = write_report(run).read_text(encoding="utf-8")
    assert "demo-run" in page and "3.11.9" in page  # run id and environment
    assert "<pre>project:\n  name: demo &amp; &lt;friends&gt;" in page  # config, escaped
    assert "0.8500 ± 0.0707" in page  # mean ± std row of the fold table
    assert page.count("<td>0.8000</td>") >= 1 and "<td>0.9000</td>" in page  # per-fold best macro_f1
    assert "0.8512" in page and "0.8634" in page  # OOF metrics
    assert "1.7321" in page and "0.0213" in page  # calibration
    assert "Per-class metrics (oof)" in page  # oof preferred over val
    assert 'class="low">0.5000' in page  # a weak class stands out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page  # no text from the run becomes markup
    assert "document.body.dataset.imagesOk" in page


def test_report_of_an_unfinished_run(tmp_path: Path) -> None:
    """No summary, no eval, no PNG: the page still renders, says why the table is missing, shows no image."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    page = write_report(run).read_text(encoding="utf-8")
    assert "summary.json is missing" in page
    assert "<img" not in page
    assert "<pre>a: 1" in page
    assert not list(run.glob(".*.tmp"))  # the atomic write left no temporary file


@dataclass
class Visit:
    """What headless Chromium saw of one page: the DOM after load, the page's console messages and the URLs
    the page itself asked the network for (the browser's own background traffic is left out)."""

    dom: str
    console: list[str]
    requests: list[str]


def visit(page: Path, profile: Path, timeout: float = 90) -> Visit:
    """Load ``page`` in headless Chromium with no network side channels, logging its console and its net-log."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    net_log = profile / "net-log.json"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--virtual-time-budget=5000", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", "--dump-dom", page.as_uri()]
    done = subprocess.run([exe, *flags], capture_output=True, text=True, timeout=timeout, check=True)
    # Console messages (console.*, uncaught errors, blocked loads, CSP violations) are logged as INFO:CONSOLE
    # lines naming the page as their source.
    console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln and page.as_uri() in ln]
    return Visit(done.stdout, console, page_requests(net_log))


def page_requests(net_log: Path) -> list[str]:
    """URLs the page's own frame requested: URL_REQUEST_START_JOB events isolated under the file:// page.

    Chromium's background requests (update checks and the like) carry no page in their isolation key."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] == start_job and "file://" in params.get("network_isolation_key", ""):
            if not params.get("url", "").startswith(("file:", "data:")):
                urls.append(params["url"])
    return urls


def test_report_loads_in_headless_chromium_offline_and_clean(run: Path, tmp_path: Path) -> None:
    """The page makes no network request, every image decodes, and nothing is written to the console."""
    seen = visit(write_report(run), tmp_path / "profile")
    n_images = seen.dom.count("<img")
    assert n_images == len(all_pngs(run)) > 0
    assert f'data-images-ok="{n_images}/{n_images}"' in seen.dom, re.findall(r"data-images-ok=\"[^\"]*\"", seen.dom)
    assert seen.requests == []
    assert seen.console == []


def test_headless_check_catches_a_broken_image(run: Path, tmp_path: Path) -> None:
    """The images-ok counter is not vacuous: a .png that is not an image is counted as not loaded.

    (A PNG cut short still counts as loaded: Chromium shows the rows it could decode.)"""
    (run / "plots" / "zz_broken.png").write_bytes(b"not a PNG: a write that went wrong")
    dom = visit(write_report(run), tmp_path / "profile").dom
    n_images = dom.count("<img")
    assert f'data-images-ok="{n_images - 1}/{n_images}"' in dom


def test_headless_check_catches_requests_and_console_errors(tmp_path: Path) -> None:
    """The offline and clean-console checks are not vacuous: a page (without the report's CSP) that fetches an
    image and logs an error is caught on both counts."""
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    seen = visit(page, tmp_path / "profile")
    assert seen.requests == ["http://127.0.0.1:9/x.png"]
    assert any('"boom"' in line for line in seen.console)


def test_the_report_train_writes_shows_the_runs_final_status(tmp_path: Path) -> None:
    """The report written at the end of ``train`` is drawn once run.json holds the final status, so it agrees with
    run.json and with what ``vistrain report RUN`` draws later."""
    from conftest import tiny_config, write_csv_dataset

    from vistrain.config.loader import validate
    from vistrain.engine.training import run_train

    data = write_csv_dataset(tmp_path / "data", classes=("a", "b"), per_class=4, size=16)
    cfg = validate(tiny_config(data.root, model={"name": "test_resnet"}, train={"epochs": 1},
                               tracking={"tensorboard": False},
                               output={"exp_dir": str(tmp_path / "exp"), "logs_dir": None}))
    run = run_train(cfg).run_dir
    assert json.loads((run / "run.json").read_text())["status"] == "success"
    header = re.search(r'<div class="meta">([^<]*)</div>', (run / "report.html").read_text(encoding="utf-8"))
    assert header is not None and header.group(1).startswith("status: success |"), header
