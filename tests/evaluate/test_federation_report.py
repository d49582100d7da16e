"""The report `fadal federate --deployment` writes on the coordinator, which holds no images."""

from __future__ import annotations

import json

from fadal.config import FederationConfig, SiteSpec
from fadal.evaluate.federation import federation_report
from fadal.records import FederationHistory, RoundEntry


def _round(r: int, dice: dict | None) -> RoundEntry:
    return RoundEntry(round=r, loss=1.0 / r, seconds=10.0, sites=2, dice=dice,
                      bytes_down_per_site={"101": 3_000_000, "202": 3_000_000},
                      bytes_up_per_site={"101": 3_000_000, "202": 3_000_000})


def test_deployment_report_uses_the_last_federated_evaluation(tmp_path):
    cfg = FederationConfig(sites=[SiteSpec(name="a", data=tmp_path / "nowhere_a"),
                                  SiteSpec(name="b", data=tmp_path / "nowhere_b")], out=tmp_path / "run")
    history = FederationHistory(rounds=[_round(1, {"liver": 0.4, "mean": 0.4}), _round(2, {"liver": 0.6, "mean": 0.6}),
                                        _round(3, None)])
    paths = federation_report(cfg, history, evaluate_sites=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"variants": {"federated (fedavg)": {
        "sites (federated evaluation, round 2)": {"liver": {"dice": 0.6}, "mean": {"dice": 0.6}}}}}
    md = paths["markdown"].read_text()
    assert "## Communication" in md and "| all rounds | 9.0 | 9.0 | 9.0 | 9.0 | 36.0 |" in md
    assert "| federated (fedavg) | 3 |" in md  # training table: three rounds
    # Nothing evaluated anywhere: no report rather than an empty one.
    assert federation_report(cfg.model_copy(update={"out": tmp_path / "none"}),
                             FederationHistory(rounds=[_round(1, None)]), evaluate_sites=False) is None
    assert not (tmp_path / "none" / "report.html").exists()


def test_fadal_report_rebuilds_a_federation_report_from_its_history(tmp_path):
    from typer.testing import CliRunner

    from fadal.cli import app
    from fadal.data.io import write_record

    run = tmp_path / "run"
    cfg = FederationConfig(sites=[SiteSpec(name="a", data=tmp_path / "nowhere_a"),
                                  SiteSpec(name="b", data=tmp_path / "nowhere_b")], out=run, strategy="fedprox")
    history = FederationHistory(rounds=[_round(1, {"mean": 0.4}), _round(2, {"mean": 0.6})], config=cfg.model_dump(mode="json"))
    federation_report(cfg, history, evaluate_sites=False)
    write_record(history, run / "history.json", exclude_none=True)
    (run / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "| federated (fedprox) | 2 |" in (run / "report.md").read_text()
