"""benchmarks/label_efficiency.py --quick end to end on real OpenKBP scans: every stage runs (views,
amplification, synthesis, self-training, training, scoring) and results.json has its documented shape."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "label_efficiency.py"

pytestmark = [pytest.mark.slow, pytest.mark.shared_data,
              pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")]


def _load():
    spec = importlib.util.spec_from_file_location("label_efficiency", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quick_label_efficiency_writes_results(shared_data, tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench"
    # The quick settings on a tiny subset: two of the three sites.
    rc = bench.main(["--quick", "--train-data", str(shared_data / "openkbp"), "--out", str(out), "--threads", "1",
                     "--sites", "A,B"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["sites"]) == {"A", "B"}
    for plan in doc["sites"].values():
        assert len(plan["atlases"]) == 1 and len(plan["unlabeled"]) == 2 and len(plan["validation"]) == 1
    expected = {f"k1/{v}" for v in bench.VARIANTS} | {"full"}
    assert set(doc["runs"]) == expected
    for name, run in doc["runs"].items():
        mean = run["summary"]["mean"]
        assert 0.0 <= mean["dice"] <= 1.0 and {"dice", "hd95", "surface_dice", "n"} <= set(mean)
        assert set(run["per_site"]) == {"A", "B"} and run["steps"] == bench.QUICK.steps
        organs = [o for o in run["summary"] if o != "mean"]
        assert organs and all("dice" in run["summary"][o] and "hd95" in run["summary"][o] for o in organs)
    assert set(doc["recovery"]) == expected - {"full"}
    assert all(v >= 0 for row in doc["recovery"].values() for v in row.values())
    assert set(doc["pseudo_labels"]) == {"k1/fusion", "k1/selftrain"}
    assert doc["runs"]["k1/synthesis"]["synthetic_share"] > 0 and doc["runs"]["k1/fusion"]["synthetic_share"] == 0
    assert doc["runs"]["k1/selftrain"]["rounds"][-1]["round"] == 1
    assert {"amplify_s", "synthesis_learn_s", "train_s", "eval_s", "total_s"} <= set(doc["timing"])
    printed = capsys.readouterr().out
    assert "Fraction of the full-label Dice recovered" in printed and "HD95" in printed
