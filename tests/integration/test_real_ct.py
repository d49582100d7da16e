"""Real CT from ../shared/data through the loaders and `fadal predict` (orientation, HU, geometry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fadal.cli import app
from fadal.config import TrainConfig
from fadal_testing import tiny_plan
from fadal.data.io import read_image, same_geometry
from fadal.errors import FadalInputError
from fadal.data.site import load_site
from fadal.model.infer import save_checkpoint
from fadal.model.net import build_network

runner = CliRunner()


def _openkbp_subset(shared: Path, dest: Path, n: int = 3) -> Path:
    """A few OpenKBP cases as their own site folder (symlinks; nothing copied)."""
    src = shared / "openkbp"
    cases = json.loads((src / "cases.json").read_text())
    chosen = [c for c in sorted(cases) if set(cases[c]["annotated"]) != set(json.loads(
        (src / "dataset.json").read_text())["labels"]) - {"background"}][:n]
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True)
    for c in chosen:
        (dest / "imagesTr" / f"{c}_0000.nii.gz").symlink_to(src / "imagesTr" / f"{c}_0000.nii.gz")
        (dest / "labelsTr" / f"{c}.nii.gz").symlink_to(src / "labelsTr" / f"{c}.nii.gz")
    (dest / "dataset.json").symlink_to(src / "dataset.json")
    json.dump({c: cases[c] for c in chosen}, open(dest / "cases.json", "w"))
    return dest


def test_openkbp_partial_annotations_load(shared_data, tmp_path):
    site = load_site(_openkbp_subset(shared_data, tmp_path / "kbp"))
    assert len(site.labeled) == 3 and not site.unlabeled
    all_organs = set(site.organs)
    for case in site.labeled:
        # These cases were chosen because some organs were never drawn: they must stay unknown.
        assert set(case.annotated) < all_organs
        image = read_image(case.image)
        hu = sitk.GetArrayViewFromImage(image)
        assert -1100 < hu.min() < -500 and hu.max() > 500  # air and bone in HU
        assert np.allclose(image.GetDirection(), (1, 0, 0, 0, 1, 0, 0, 0, -1))  # LPI as stored


def test_openkbp_wrong_cases_json_is_caught(shared_data, tmp_path):
    root = _openkbp_subset(shared_data, tmp_path / "kbp", n=1)
    cases = json.loads((root / "cases.json").read_text())
    cid = next(iter(cases))
    cases[cid]["annotated"] = cases[cid]["annotated"][:-1]  # claims one drawn organ was not drawn
    json.dump(cases, open(root / "cases.json", "w"))
    with pytest.raises(FadalInputError, match="lists only"):
        load_site(root)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, shared_data) -> Path:
    labels = {"background": 0, **json.loads((shared_data / "totalseg_example" / "labels.json").read_text())["labels"]}
    labels = {k: i for i, k in enumerate(labels)}  # contiguous values for the network's channels
    plan = tiny_plan((4, 8, 16), spacing_mm=4.0, patch=(64, 64, 64))  # a few windows per real CT
    model = build_network(len(labels), plan.network)
    # Make the (untrained) network answer "liver" everywhere, so that every export has an organ to show.
    last_bias = [k for k in model.state_dict() if k.endswith("bias")][-1]
    with torch.no_grad():
        model.state_dict()[last_bias][labels["liver"]] += 50.0
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model.pt", labels, plan, TrainConfig())


def test_predict_cli_on_real_nifti_and_dicom(shared_data, tmp_path, tiny_checkpoint):
    nifti = shared_data / "totalseg_example" / "example_ct_sm.nii.gz"
    kbp = shared_data / "openkbp" / "imagesTr" / "kbp_001_0000.nii.gz"
    dicom = shared_data / "totalseg_example" / "example_ct_dicom"
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(nifti), str(kbp), str(dicom), "--model", str(tiny_checkpoint),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name, src in (("example_ct_sm", nifti), ("kbp_001", kbp), ("example_ct_dicom", dicom)):
        pred = read_image(out / f"{name}.nii.gz")
        assert same_geometry(pred, read_image(src)) is None, name
        assert pred.GetPixelID() == sitk.sitkUInt8
        for fmt in ("stl", "obj", "vtp"):
            assert (out / name / "meshes" / f"liver.{fmt}").exists()
        for view in ("view_anterior.png", "view_oblique.png", "overlay.png"):
            assert (out / name / "views" / view).stat().st_size > 1000
    # The liver mesh covers the predicted liver in world coordinates (here: the whole scan's box).
    import trimesh

    mesh = trimesh.load(out / "example_ct_sm" / "meshes" / "liver.stl")
    image = read_image(nifti)
    corners = np.array([image.TransformIndexToPhysicalPoint([i * (n - 1) for i, n in zip(c, image.GetSize())])
                        for c in np.ndindex(2, 2, 2)])
    spacing = max(image.GetSpacing())
    assert np.allclose(mesh.bounds[0], corners.min(0), atol=spacing)
    assert np.allclose(mesh.bounds[1], corners.max(0), atol=spacing)
    # DICOM input: a DICOM-SEG that re-reads with the CT's frame of reference and one segment.
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(out / "example_ct_dicom" / "seg.dcm")
    ct = pydicom.dcmread(next(p for p in sorted(dicom.iterdir()) if p.is_file()), stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert len(seg.SegmentSequence) == 1 and seg.SegmentSequence[0].SegmentLabel == "liver"
    # Re-running skips finished cases (the files are not rewritten).
    before = (out / "kbp_001.nii.gz").stat().st_mtime_ns
    result = runner.invoke(app, ["predict", str(kbp), "--model", str(tiny_checkpoint), "--out", str(out)])
    assert result.exit_code == 0 and (out / "kbp_001.nii.gz").stat().st_mtime_ns == before


def test_predict_cli_reports_bad_input(tmp_path, tiny_checkpoint):
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(bad), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "broken_0000.nii.gz" in result.output and "unreadable" in result.output
