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
