"""`fadal plan` then `fadal train` from YAML, as a user runs them; a broken plan file is one clear line
(a wrong --model and other bad inputs: tests/cli/test_bad_inputs.py)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from fadal.cli import app
from fadal.records import Plan
from fadal.model.infer import load_checkpoint
from fadal_testing import write_site


def test_plan_then_train_from_yaml(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=2, n_unlabeled=1, n_test=1)
    planner = tmp_path / "planner.yaml"
    planner.write_text(yaml.safe_dump({"channels": [4, 8], "spacing_mm": [8, 8, 8], "budget_minutes": 0.5}))
    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--site", str(site), "--config", str(planner), "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json((tmp_path / "plan.json").read_text())
    assert plan.preprocess.spacing_mm == (8.0, 8.0, 8.0) and plan.network.channels == (4, 8)
    assert plan.fingerprint is not None and plan.fingerprint.labeled_scans == 2
    assert "patch" in result.output and "spacing" in result.output

    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({"sites": [{"name": "s", "data": "site"}], "out": "run",
                                          "train": {"steps": 4, "num_threads": 1}}))
    result = runner.invoke(app, ["train", "--config", str(train_yaml), "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    model, labels, used, _ = load_checkpoint(tmp_path / "run" / "model.pt")  # relative paths: next to the YAML
    assert used == plan and labels["organA"] == 1
    assert json.loads((tmp_path / "run" / "history.json").read_text())["steps"] == 4


def test_train_with_a_broken_plan_file_is_one_clear_line(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=0)
    (tmp_path / "plan.json").write_text('{"patch_size": [30, 32, 32]}')
    result = CliRunner().invoke(app, ["train", "--site", str(site), "--plan", str(tmp_path / "plan.json"),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "plan.json: not a valid plan" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
