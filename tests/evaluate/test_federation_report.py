"""The report `fadal federate --deployment` writes on the coordinator, which holds no images."""

from __future__ import annotations

import json

from fadal.config import FederationConfig, SiteSpec
from fadal.evaluate.federation import federation_report


def _round(r: int, dice: dict | None) -> dict:
    entry = {"round": r, "loss": 1.0 / r, "seconds": 10.0, "sites": 2,
             "bytes_down_per_site": {"101": 3_000_000, "202": 3_000_000},
             "bytes_up_per_site": {"101": 3_000_000, "202": 3_000_000}}
    if dice is not None:
        entry["dice"] = dice
    return entry


def test_deployment_report_uses_the_last_federated_evaluation(tmp_path):
    cfg = FederationConfig(sites=[SiteSpec(name="a", data=tmp_path / "nowhere_a"),
                                  SiteSpec(name="b", data=tmp_path / "nowhere_b")], out=tmp_path / "run")
    history = {"rounds": [_round(1, {"liver": 0.4, "mean": 0.4}), _round(2, {"liver": 0.6, "mean": 0.6}),
                          _round(3, None)]}
    paths = federation_report(cfg, history, evaluate_sites=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"variants": {"federated (fedavg)": {
        "sites (federated evaluation, round 2)": {"liver": {"dice": 0.6}, "mean": {"dice": 0.6}}}}}
    md = paths["markdown"].read_text()
    assert "## Communication" in md and "| all rounds | 9.0 | 9.0 | 9.0 | 9.0 | 36.0 |" in md
    assert "| federated (fedavg) | 3 |" in md  # training table: three rounds
    # Nothing evaluated anywhere: no report rather than an empty one.
    assert federation_report(cfg.model_copy(update={"out": tmp_path / "none"}),
                             {"rounds": [_round(1, None)]}, evaluate_sites=False) is None
    assert not (tmp_path / "none" / "report.html").exists()
