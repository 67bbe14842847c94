"""The comparison as a researcher sees it: a real `mlflow server` over a small real study, opened in
headless Chromium (Debian's, driven by Playwright). Screenshots go to outputs/screenshots/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import run_cli, runs_of
from pipeline.config import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = PROJECT_ROOT / "outputs" / "screenshots"
ARMS = ("probs", "logits", "probs_naive")


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it with apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield launched
        launched.close()


def test_experiment_page_lists_every_formulation_and_the_report_renders(tmp_path, data_dir, mlflow_server, browser):
    result = run_cli("pipeline.run", "-m", "loss=probs,logits,probs_naive", "seed=0", "train.epochs=2", "hydra/launcher=basic",
                     f"data_dir={data_dir}", "study=browser", f"reports_dir={tmp_path / 'reports'}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-2000:]
    (parent,) = [r for r in runs_of(mlflow_server) if r.data.tags.get("role") == "study"]
    experiment = parent.info.experiment_id
    SHOTS.mkdir(parents=True, exist_ok=True)

    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs", wait_until="domcontentloaded")
    page.get_by_text("study-browser").first.wait_for(timeout=60_000)
    close_assistant(page)
    # Child runs are folded under their study's parent run: unfold them as a researcher would.
    page.locator("div[role=row]", has_text="study-browser").first.locator(
        "button[data-component-id*='runnamecellrenderer']").click()
    for arm in ARMS:
        page.get_by_text(f"{arm}-seed0", exact=True).first.wait_for(timeout=20_000)
    # The Dataset column, filled by each run's mlflow.log_input: one entry per child run.
    datasets = page.get_by_text("mnist_sample", exact=False)
    datasets.first.wait_for(timeout=20_000)
    assert datasets.count() >= len(ARMS)
    page.screenshot(path=str(SHOTS / "mlflow_experiment.png"))

    page.goto(f"{mlflow_server}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/report/report.html",
              wait_until="domcontentloaded")
    report = None
    for _ in range(120):  # the artifact viewer loads the HTML into a frame of its own
        report = next((f for f in page.frames if "Study" in _text(f)), None)
        if report:
            break
        page.wait_for_timeout(500)
    assert report is not None, "the report artifact did not render"
    text = _text(report)
    assert "Study browser: probabilities or logits?" in text
    assert all(arm in text for arm in ARMS)
    assert report.locator("img").count() == 5  # the embedded plots: the atlas and four per setting
    page.screenshot(path=str(SHOTS / "mlflow_report.png"))

    # The built-in compare view, with the study's children side by side.
    children = [r.info.run_id for r in runs_of(mlflow_server) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    page.goto(f"{mlflow_server}/#/compare-runs?runs={quote(json.dumps(children))}&experiments={quote(json.dumps([experiment]))}",
              wait_until="domcontentloaded")
    page.get_by_text("Comparing 3 Runs").first.wait_for(timeout=60_000)
    close_assistant(page)
    for arm in ARMS:
        page.get_by_text(f"{arm}-seed0", exact=True).first.wait_for(timeout=20_000)
    page.screenshot(path=str(SHOTS / "mlflow_compare.png"))


def close_assistant(page) -> None:
    """MLflow 3.x opens an assistant panel beside the page; it only hides the runs in screenshots."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _text(frame) -> str:
    try:
        return frame.inner_text("body", timeout=1000)
    except Exception:  # noqa: BLE001 - a frame that is still loading has no body yet
        return ""
