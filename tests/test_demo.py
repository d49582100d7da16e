"""The whole path, end to end, through the CLI: phantom -> amplify -> local/federated -> evaluate -> report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fadal.cli import app
from fadal.demo import QUICK


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    variants = metrics["variants"]
    assert set(variants) == {"local", "federated", "federated+amplified"}
    for variant in variants.values():
        assert set(variant) == {"site_A", "site_B"}
        for site in variant.values():
            assert 0.0 <= site["mean"]["dice"] <= 1.0
    # Amplification wrote a label, a confidence map and provenance for each unlabeled scan.
    for site in ("site_A", "site_B"):
        amp = out / "amplified" / site
        assert len(list((amp / "labels").glob("*.nii.gz"))) == 1
        assert len(list((amp / "confidence").glob("*.nii.gz"))) == 1
        prov = json.loads(next((amp / "provenance").glob("*.json")).read_text())
        assert len(prov["atlases"]) == 2
    # Federated runs checkpointed every round; the report is self-contained.
    for run in ("federated", "federated_amplified"):
        rounds = QUICK.rounds * (QUICK.sites if QUICK.strategy == "cyclic" else 1)  # cyclic: one site a round
        assert sorted(p.name for p in (out / run / "checkpoints").iterdir()) == [f"round_{r:03d}.pt" for r in
                                                                               range(1, rounds + 1)]
    html = (out / "report.html").read_text()
    assert "federated+amplified" in html and "data:image/png;base64," in html
    assert "Mean Dice on held-out scans" in result.output
