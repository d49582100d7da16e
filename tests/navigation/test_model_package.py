"""`fadal export` writes a self-checked package; `fadal predict` runs it (without the training stack) and
gives the eager checkpoint's label maps voxel for voxel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fadal.cli import app
from fadal_testing import tiny_plan, write_site

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained for a few steps on a tiny site, and its exported package."""
    root = tmp_path_factory.mktemp("pkg")
    site = write_site(root / "site", n_labeled=2, n_unlabeled=0, n_test=1)
    plan = root / "plan.json"
    plan.write_text(tiny_plan((4, 8), spacing_mm=4.0, patch=(16, 16, 16)).model_dump_json())
    result = runner.invoke(app, ["train", "--site", str(site), "--plan", str(plan), "--steps", "3",
                                 "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "--model", str(root / "run" / "model.pt"), "--out", str(root / "package")])
    assert result.exit_code == 0, result.output
    assert "labels identical: True" in result.output
    return {"site": site, "checkpoint": root / "run" / "model.pt", "package": root / "package",
            "ct": site / "imagesTs" / "case_002_0000.nii.gz"}


def test_manifest_describes_the_package_and_its_check(trained):
    manifest = json.loads((trained["package"] / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["format"] == "fadal-model-package"
    assert manifest["labels"] == {"background": 0, "organA": 1, "organB": 2}
    assert manifest["plan"]["patch_size"] == [16, 16, 16]
    assert manifest["graph_input_shape"] == [1, 1, 16, 16, 16]
    check = manifest["check"]
    assert check["passed"] and check["labels_identical"] and check["windows"] > 1
    assert check["tolerance"] == 1e-4 and check["max_abs_logit_diff"] <= 1e-4
    for name in ("model.pt2", "weights.pt"):
        assert (trained["package"] / name).is_file() and len(manifest["sha256"][name]) == 64


def test_predict_from_the_package_gives_the_eager_label_maps(trained, tmp_path):
    maps = {}
    for kind in ("checkpoint", "package"):
        result = runner.invoke(app, ["predict", str(trained["ct"]), "--model", str(trained[kind]), "--out",
                                     str(tmp_path / kind), "--no-meshes", "--no-views", "--no-slicer"])
        assert result.exit_code == 0, result.output
        maps[kind] = sitk.ReadImage(str(tmp_path / kind / "case_002.nii.gz"))
    a, b = (sitk.GetArrayFromImage(maps[k]) for k in ("checkpoint", "package"))
    assert a.shape == b.shape and np.array_equal(a, b)
    assert maps["package"].GetSpacing() == maps["checkpoint"].GetSpacing()


def test_inference_from_the_package_does_not_import_the_training_stack(trained, tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fadal.cli import app\n"
        f"r = CliRunner().invoke(app, ['predict', {str(trained['ct'])!r}, '--model', {str(trained['package'])!r},"
        f" '--out', {str(tmp_path / 'o')!r}, '--no-views', '--no-slicer'])\n"
        "assert r.exit_code == 0, r.output\n"
        # (MONAI itself imports ITK when it is installed, for its readers: not FADAL's registration stack.)
        "bad = ('flwr', 'ray', 'fadal.federated', 'fadal.amplify', 'fadal.model.engine', 'fadal.plan')\n"
        "print(sorted({m.split('.')[0] if not m.startswith('fadal') else m for m in sys.modules"
        " if m.startswith(bad)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_damaged_package_is_one_clear_line(trained, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(trained["package"], damaged)
    with open(damaged / "model.pt2", "ab") as f:
        f.write(b"x")
    result = runner.invoke(app, ["predict", str(trained["ct"]), "--model", str(damaged), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "model.pt2 does not match the manifest's SHA-256" in result.output and "Traceback" not in result.output
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["predict", str(trained["ct"]), "--model", str(damaged), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "schema_version 99" in result.output
