"""The report: self-contained HTML, Markdown tables, PNG plots, and the comparison table used by the CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fadal.errors import FadalInputError
from fadal.evaluate.report import write_report
from fadal.evaluate.tables import comparison_table

METRICS = {
    "variants": {
        "local_only": {
            "site_a": {"liver": {"dice": 0.8, "hd95": 5.26, "surface_dice": 0.7},
                       "spleen": {"dice": 0.6, "hd95": None, "surface_dice": 0.5}},
            "site_b": {"liver": {"dice": 0.7, "hd95": 7.0, "surface_dice": 0.6},
                       "mean": {"dice": 0.7, "hd95": 7.0, "surface_dice": 0.6}},
        },
        "fadal": {
            "site_a": {"liver": {"dice": 0.9, "hd95": 3.0, "surface_dice": 0.8},
                       "spleen": {"dice": 0.85, "hd95": 4.0, "surface_dice": 0.75}},
            "site_b": {"liver": {"dice": 0.75, "hd95": 6.0, "surface_dice": 0.65}},
        },
    },
    "per_case": {"fadal": {"site_a": {"case_007": {"liver": {"dice": 0.9}}}}},
}
HISTORY = {
    "local_only": [{"round": r, "loss": 1.0 / r, "seconds": 2.0} for r in range(1, 4)],
    "fadal": [{"round": r, "loss": 0.9 / r, "dice": {"site_a": 0.5 + 0.1 * r, "site_b": 0.4 + 0.1 * r},
               "seconds": 3.0} for r in range(1, 4)],
}
AMPLIFICATION = {
    "site_a": {"scans": 10, "accepted": 7, "rejected": 3, "mean_confidence": {"liver": 0.9, "spleen": 0.8},
               "seconds": 95.0},
}


def test_comparison_table_rows():
    rows = comparison_table(METRICS)
    assert rows[0] == ["site", "organ", "local_only", "fadal"]
    assert rows[1:] == [
        ["site_a", "liver", "0.800", "0.900"],
        ["site_a", "spleen", "0.600", "0.850"],
        ["site_a", "mean", "0.700", "0.875"],  # no "mean" entry: mean over organs
        ["site_b", "liver", "0.700", "0.750"],
        ["site_b", "mean", "0.700", "0.750"],  # local_only's own "mean" entry, fadal's computed
    ]
    hd = comparison_table(METRICS, "hd95")
    assert hd[2] == ["site_a", "spleen", "\u2013", "4.0"]  # None -> dash, 1 decimal mm
    assert hd[1] == ["site_a", "liver", "5.3", "3.0"]


def test_comparison_table_rejects_bad_input():
    with pytest.raises(FadalInputError):
        comparison_table({"site_a": {}})


def test_write_report(tmp_path):
    overlay = tmp_path / "overlay.png"
    import matplotlib.image

    matplotlib.image.imsave(overlay, np.random.default_rng(0).random((8, 8)))
    out = tmp_path / "report"
    paths = write_report(out, METRICS, HISTORY, AMPLIFICATION, [(overlay, "case_007 <axial>")], title="Test run")

    html_path, md_path = paths["html"], paths["markdown"]
    assert html_path == out / "report.html" and md_path == out / "report.md"
    html = html_path.read_text(encoding="utf-8")
    for name in ["site_a", "site_b", "local_only", "fadal", "Test run", "case_007 &lt;axial&gt;"]:
        assert name in html
    # Dice bars, history curves, confidence bars and the overlay, all embedded.
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "<link" not in html
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.IGNORECASE)  # inline scripts only
    assert "0.875" in html and "\u2013" in html  # site mean, missing HD95
    assert "class=\"num best\"" in html

    md = md_path.read_text(encoding="utf-8")
    assert "| site | organ | local_only | fadal |" in md
    assert "| site_a | spleen | 0.600 | **0.850** |" in md
    assert "| site_a | liver | 5.3 | **3.0** |" in md  # HD95: lower is better
    assert "| site_a | spleen | \u2013 | 4.0 |" in md  # a single value is not "best" of anything
    assert "![" in md and "plots/dice_by_organ.png" in md

    for key in ("plot_dice_by_organ", "plot_history", "plot_confidence"):
        assert paths[key].parent == out / "plots"
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".tmp_*"))  # atomic writes leave no temporaries


def test_write_report_minimal(tmp_path):
    paths = write_report(tmp_path, {"variants": {"only": {"s": {"liver": {"dice": 0.5, "hd95": None}}}}})
    html = paths["html"].read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 1
    assert "Training" not in html and "Surface Dice" not in html
    assert (tmp_path / "plots" / "dice_by_organ.png").is_file()


def test_report_lists_communication_privacy_and_rejections(tmp_path):
    fed = [{"round": r, "loss": 1.0 / r, "seconds": 2.0, "epsilon": 0.5 * r,
            "bytes_down_per_site": {"1111111": 2_000_000, "2222222": 2_000_000},
            "bytes_up_per_site": {"1111111": 1_000_000}} for r in (1, 2)]  # node 2222222 dropped out
    amp = {"site_a": {"scans": 3, "accepted": 2, "rejected": 1, "mean_confidence": {"liver": 0.9},
                      "rejections": ["case_9: liver volume 5.0 ml outside [800, 2000] ml"],
                      "demoted": ["case_3: spleen: 4 components"]}}
    paths = write_report(tmp_path, METRICS, {"fadal": fed}, amp)
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "## Communication" in md
    assert "| round | 111111 down | 111111 up | 222222 down | 222222 up | total |" in md
    assert "| 1 | 2.00 | 1.00 | 2.00 | \u2013 | 5.00 |" in md
    assert "| all rounds | 4.0 | 2.0 | 4.0 | 0.0 | 10.0 |" in md
    assert "DP epsilon" in md and "| 1.00 |" in md  # the run's epsilon after its last round
    assert "case_9: liver volume 5.0 ml outside" in md and "1 rejected scans" in md
    assert "case_3: spleen: 4 components" in md
    html = paths["html"].read_text(encoding="utf-8")
    assert 'id="communication"' in html and "case_9" in html
    # Without per-site byte counts (local training) there is no communication section.
    plain = write_report(tmp_path / "plain", METRICS, HISTORY)["markdown"].read_text(encoding="utf-8")
    assert "Communication" not in plain and "DP epsilon" not in plain
