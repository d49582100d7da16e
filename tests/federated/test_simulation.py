"""A real Flower simulation through `fadal federate`: 2 sites, the plan made from their fingerprints (a
query round), 2 rounds, checkpoints every round, weights change, and the report scores each site's held-out cases."""

from __future__ import annotations

import json

import torch
import yaml
from typer.testing import CliRunner

from fadal_testing import write_site
from fadal.config import FederationConfig, PlannerConfig, SiteSpec, TrainConfig
from fadal.model.infer import load_checkpoint
from fadal.model.net import build_network


def test_two_sites_two_rounds_change_global_weights(tmp_path):
    from fadal.cli import app

    sites = [write_site(tmp_path / f"site_{k}", n_labeled=2, n_unlabeled=0, n_test=1) for k in range(2)]
    train = TrainConfig(seed=3)
    cfg = FederationConfig(
        sites=[SiteSpec(name=f"site_{k}", data=p) for k, p in enumerate(sites)],
        rounds=2, local_steps=3, train=train, out=tmp_path / "run",
        planner=PlannerConfig(channels=(4, 8, 16), patch_size=(16, 16, 16), spacing_mm=(4.0, 4.0, 4.0)),
    )
    (tmp_path / "fl.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["federate", "--config", str(tmp_path / "fl.yaml")])
    assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "run" / "history.json").read_text())

    rounds = [r for r in history["rounds"] if "loss" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == 2 and r["failures"] == 0 for r in rounds)
    assert all(r["bytes_up"] > 0 for r in rounds)
    assert all("mean" in r["dice"] for r in rounds)  # per-round federated evaluation happened
    for r in (1, 2):
        assert (tmp_path / "run" / "checkpoints" / f"round_{r:03d}.pt").exists()

    # The plan came from both sites' fingerprints (aggregate statistics) and went into every checkpoint.
    model, labels, plan, ckpt = load_checkpoint(tmp_path / "run" / "global_model.pt")
    assert plan.fingerprint is not None and plan.fingerprint.sites == 2 and plan.fingerprint.labeled_scans == 4
    assert plan.network.channels == (4, 8, 16) and plan.patch_size == (16, 16, 16)
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == plan.model_dump(mode="json")

    # The initial global model is what the server built from the seed: the result must differ.
    from fadal.model.engine import seed_everything

    seed_everything(train.seed)
    initial = build_network(3, plan.network).state_dict()
    assert ckpt["round"] == 2 and labels["organA"] == 1
    final = model.state_dict()
    changed = [k for k in final if not torch.allclose(final[k], initial[k])]
    assert len(changed) >= len(final) // 2
    r1, _, _, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round_001.pt")
    assert any(not torch.allclose(r1.state_dict()[k], final[k]) for k in final)

    # The report: per site and organ on each site's held-out case, per-round curves, bytes per site.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scored = metrics["variants"]["federated (fedavg)"]
    assert set(scored) == {"site_0", "site_1"}
    assert all(0.0 <= scored[s]["organA"]["dice"] <= 1.0 for s in scored)
    assert len(list((tmp_path / "run" / "predictions" / "site_0").glob("*.nii.gz"))) == 1
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Training" in md and "## Communication" in md and "| all rounds |" in md
    assert str(tmp_path / "run" / "report.html") in result.output.replace("\n", "")


def test_both_simulation_backends_give_the_same_federation(tmp_path):
    """'in-process' (the default: no Ray start) and Flower's Ray backend run the same rounds to the same weights."""
    import ray

    from fadal.federated.simulation import simulate

    site = write_site(tmp_path / "site_0", n_labeled=1, n_unlabeled=0, n_test=0)
    weights = {}
    for backend in ("in-process", "ray"):
        cfg = FederationConfig(sites=[SiteSpec(name="site_0", data=site)], rounds=2, local_steps=2, evaluate_every=0,
                               train=TrainConfig(seed=1, num_threads=1), out=tmp_path / backend,
                               simulation_backend=backend,
                               planner=PlannerConfig(channels=(4, 8), patch_size=(16, 16, 16), spacing_mm=(8, 8, 8)))
        history = simulate(cfg)
        assert [r.sites for r in history.rounds if r.loss is not None] == [1, 1]
        assert not ray.is_initialized()  # Ray shut down after its run; never started in-process
        weights[backend] = load_checkpoint(tmp_path / backend / "global_model.pt")[0].state_dict()
    for key, value in weights["in-process"].items():
        assert torch.equal(value, weights["ray"][key]), key
