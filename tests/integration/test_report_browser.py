"""The report opens in a real (headless) browser: no JavaScript errors, the 3D view draws, a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fadal_testing import make_volume
from fadal.evaluate.report import write_report
from fadal.navigation.meshes import organ_meshes
from fadal.navigation.viewer import viewer_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)


@pytest.fixture
def report(tmp_path) -> Path:
    _, seg = make_volume(shape=(40, 36, 24), spacing=(2.0, 2.0, 3.0))
    labels = {"background": 0, "liver": 1, "spleen": 2}
    meshes = organ_meshes(seg, labels)
    metrics = {"variants": {"local": {"site_A": {"liver": {"dice": 0.71, "hd95": 9.5}, "spleen": {"dice": 0.4, "hd95": None}}},
                            "federated": {"site_A": {"liver": {"dice": 0.88, "hd95": 4.1}, "spleen": {"dice": 0.8, "hd95": 6.0}}}}}
    history = {"federated": [{"round": 1, "loss": 1.2, "dice": {"mean": 0.5}}, {"round": 2, "loss": 0.8, "dice": {"mean": 0.7}}]}
    return write_report(tmp_path / "run", metrics, history=history, viewer=viewer_html(meshes))["html"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_renders_without_script_errors(report, tmp_path):
    dom = _chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'data-js-errors="0"', html), "script errors while loading the report"
    drawn = re.search(r'data-rendered="(\d+)"', html)
    assert drawn and int(drawn.group(1)) > 100, "the 3D organ view did not draw"
    assert "federated" in html and "site_A" in html

    shot = tmp_path / "report.png"
    res = _chromium("--window-size=1200,1600", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))
    assert pixels.shape[:2] == (1600, 1200)
    assert float(np.std(pixels)) > 10  # not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_a_mid_run_page_shows_each_sites_status(tmp_path):
    """The live page of a federation after round 1 of 3 (before any federated evaluation): it loads without
    script errors, reloads itself, and the browser shows each site's status and its training seconds."""
    from fadal.config import FederationConfig, SiteSpec
    from fadal.evaluate.live import live_federation_page
    from fadal.records import FederationHistory, RoundEntry

    cfg = FederationConfig(sites=[SiteSpec(name=n, data=tmp_path / n) for n in ("a", "b", "c")], rounds=3,
                           out=tmp_path / "run")
    history = FederationHistory(rounds=[RoundEntry(
        round=1, loss=0.9, seconds=61.0, sampled=3, sites=2, failures=1,
        site_status={"1111": "answered", "2222": "answered", "3333": "no reply"},
        train_seconds_per_site={"1111": 40.5, "2222": 52.25})])
    page = live_federation_page(cfg, history)
    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'data-js-errors="0"', html), "script errors while loading the live page"
    assert 'http-equiv="refresh"' in html and 'data-run-state="running"' in html
    assert "Running: 1 of 3 rounds done" in html and "to go" in html
    rows = {m.group(1): m.group(2) for m in re.finditer(r"<tr[^>]*><td>(\d{4})</td><td>([a-z ]+)</td>", html)}
    assert rows == {"1111": "answered", "2222": "answered", "3333": "no reply"}
    assert "52.2" in html or "52.3" in html  # site 2222's training seconds
