"""`fadal amplify --config`: fusion, synthesis and self-training from one config, on a phantom site
(real registrations, real training steps), resumable, with what training then reads."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from fadal.amplify.chain import amplify_chain
from fadal.cli import app
from fadal.config import AmplifyConfig, SelfTrainConfig, SynthesisConfig, TrainConfig
from fadal.data.io import read_record
from fadal.data.site import load_site
from fadal.errors import FadalInputError
from fadal.model.infer import save_checkpoint
from fadal.model.net import build_network
from fadal.model.patches import site_training_items, training_label_dir
from fadal.records import AmplificationReport
from fadal_testing import tiny_plan

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG, on importing itk

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spine": 3}
PLAN = tiny_plan((4, 8), spacing_mm=8.0, patch=(16, 16, 16))
TINY_TRAIN = TrainConfig(steps=4, seed=1, num_threads=1)


def _site(root, phantom):
    """Two atlases and two unlabeled scans of the phantom (shifted, warped, other grids and directions)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    scans = {"a001": phantom(44, 4.5, shift_mm=(6.0, -4.0, 3.0), warp_mm=4.0, flip=True, seed=2),
             "a002": phantom(40, 5.0, shift_mm=(-5.0, 3.0, -4.0), warp_mm=3.0, seed=3),
             "u001": phantom(48, 4.0, seed=1),
             "u002": phantom(46, 4.2, shift_mm=(3.0, 2.0, -2.0), warp_mm=5.0, seed=4)}
    for case, (img, lab) in scans.items():
        sitk.WriteImage(img, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        if case.startswith("a"):
            sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}.nii.gz"))
    return root


def _config(tmp_path, fast_cfg, **selftrain) -> AmplifyConfig:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(PLAN.model_dump_json())
    return AmplifyConfig(registration=fast_cfg(workers=1), plan=plan_path,
                         synthesis=SynthesisConfig(registration=fast_cfg(), max_targets=2),
                         selftrain=SelfTrainConfig(rounds=1, train=TINY_TRAIN, **selftrain))


def test_one_config_runs_every_stage_and_training_reads_the_last(tmp_path, phantom, fast_cfg, one_itk_thread):
    site = load_site(_site(tmp_path / "site", phantom))
    out = tmp_path / "amp"
    report = amplify_chain(site, out, _config(tmp_path, fast_cfg))
    assert read_record(AmplificationReport, out / "amplification.json") == report
    assert report.fusion.n_scans == 2 and report.fusion.n_registrations_this_run == 4
    syn = report.synthesis
    # Every atlas x target transform is either kept or rejected with its reason.
    assert syn.transforms_kept + len(syn.transforms_rejected) == 4 and syn.transforms_kept >= 2
    assert syn.transforms_cached == 0 and syn.spacing_mm == PLAN.preprocess.spacing_mm
    st = report.selftrain
    assert st.model.startswith("trained here") and [r["round"] for r in st.rounds] == [1]
    assert st.rounds[0]["scans"] == 2 and st.rounds[0]["accepted"] + len(st.rounds[0]["rejected"]) == 2
    assert report.training_labels == f"selftrain/round_1/{site.name}"
    # Training reads the refined labels, not the fused ones.
    assert training_label_dir(out) == out / report.training_labels
    pseudo = [it for it in site_training_items(site, out, True) if "u0" in str(it["image"])]
    assert len(pseudo) == st.rounds[0]["accepted"]
    assert all(str(it["label"]).startswith(str(out / report.training_labels)) for it in pseudo)

    # A re-run redoes nothing: no registration, every transform from the cache, self-training not retrained.
    again = amplify_chain(site, out, _config(tmp_path, fast_cfg))
    assert again.fusion.n_registrations_this_run == 0
    assert again.synthesis.transforms_cached == again.synthesis.transforms_kept == syn.transforms_kept
    assert again.selftrain == st


def test_a_given_model_refines_once_and_resumes(tmp_path, phantom, fast_cfg, one_itk_thread):
    site = load_site(_site(tmp_path / "site", phantom))
    model_path = save_checkpoint(build_network(4, PLAN.network), tmp_path / "global_model.pt", LABELS, PLAN, TINY_TRAIN)
    cfg = _config(tmp_path, fast_cfg, model=model_path).model_copy(update={"synthesis": None, "plan": None})
    out = tmp_path / "amp"
    report = amplify_chain(site, out, cfg)
    assert report.synthesis is None and report.selftrain.model == str(model_path)
    refined = out / report.training_labels
    assert report.training_labels.startswith("selftrain/model_") and refined.name == "round_1"
    marks = {p.name: p.stat().st_mtime_ns for p in (refined / "provenance").glob("*.json")}
    assert sorted(marks) == ["u001.json", "u002.json"]
    again = amplify_chain(site, out, cfg)
    assert again.training_labels == report.training_labels
    assert {p.name: p.stat().st_mtime_ns for p in (refined / "provenance").glob("*.json")} == marks  # not redone

    wrong = save_checkpoint(build_network(3, PLAN.network), tmp_path / "other.pt", {"background": 0, "a": 1, "b": 2},
                            PLAN, TINY_TRAIN)
    with pytest.raises(FadalInputError, match="other.pt: the model's labels"):
        amplify_chain(site, out, cfg.model_copy(update={"selftrain": cfg.selftrain.model_copy(update={"model": wrong})}))


def test_cli_reads_the_stages_from_yaml_with_paths_relative_to_it(tmp_path, phantom, fast_cfg, one_itk_thread):
    site = _site(tmp_path / "site", phantom)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "plan.json").write_text(PLAN.model_dump_json())
    reg = fast_cfg(workers=1).model_dump(mode="json", include={"resolutions", "affine_iterations", "bspline_iterations",
                                                                "spatial_samples", "workers"})
    (tmp_path / "cfg" / "amplify.yaml").write_text(yaml.safe_dump({
        "registration": reg, "plan": "plan.json", "synthesis": {"registration": reg, "max_targets": 1}}))
    result = CliRunner().invoke(app, ["amplify", "--site", str(site), "--out", str(tmp_path / "amp"),
                                      "--config", str(tmp_path / "cfg" / "amplify.yaml")])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps long lines
    assert "synthesis 2 transforms kept, 0 rejected" in printed and "(training reads .)" in printed
    report = read_record(AmplificationReport, tmp_path / "amp" / "site" / "amplification.json")
    assert report.selftrain is None and report.synthesis.transforms_kept + len(report.synthesis.transforms_rejected) == 2
