"""Bad input, tried as a new user would: every command ends non-zero with one line naming the file and
the problem, no traceback, and nothing written (inputs are checked up front, where they are read).

The classes are the README's promises (geometry mismatch, label values not in dataset.json, NaN or
constant volumes, unreadable files, organs listed as annotated but absent or present but not listed,
unknown organ names) plus issue 14's: a truncated (half-copied) .nii.gz, an atlas label value
dataset.json does not define, a constant CT as an atlas or target, a --model that is not a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fadal.cli import app
from fadal_testing import LABELS, tiny_plan, write_site

runner = CliRunner()


def _truncate(path: Path, keep: float = 0.6) -> None:
    """A half-copied file: its first ``keep`` of the bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite(path: Path, change) -> None:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(change(arr))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def _set(value: int):
    def change(arr):
        arr[0, 0, 0] = value
        return arr
    return change


def _drop_organ_b(arr):
    arr[arr == 2] = 0
    return arr


def _nan(arr):
    arr = arr.astype(np.float32)
    arr[2, 2, 2] = np.nan
    return arr


def _shift_origin(path: Path) -> None:
    img = sitk.ReadImage(str(path))
    img.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(img, str(path))


#: (breakage, file it touches, what the error line must say). Files: Tr = imagesTr / labelsTr of the
#: tiny site (case_000, case_001 labeled = atlases, case_002 unlabeled = amplification target).
BREAKAGES = {
    "truncated atlas scan": (lambda p: _truncate(p), "imagesTr/case_000_0000.nii.gz", "truncated"),
    "truncated target scan": (lambda p: _truncate(p), "imagesTr/case_002_0000.nii.gz", "truncated"),
    "truncated label map": (lambda p: _truncate(p), "labelsTr/case_001.nii.gz", "truncated"),
    "label value not in dataset.json": (lambda p: _rewrite(p, _set(7)), "labelsTr/case_000.nii.gz",
                                        "unknown label values [7]"),
    "constant atlas scan": (lambda p: _rewrite(p, np.zeros_like), "imagesTr/case_001_0000.nii.gz", "constant volume"),
    "constant target scan": (lambda p: _rewrite(p, np.zeros_like), "imagesTr/case_002_0000.nii.gz", "constant volume"),
    "NaN voxels": (lambda p: _rewrite(p, _nan), "imagesTr/case_002_0000.nii.gz", "NaN"),
    "label on another grid": (_shift_origin, "labelsTr/case_001.nii.gz", "geometry differs"),
    "not an image at all": (lambda p: p.write_bytes(b"\x1f\x8b not really gzip"), "imagesTr/case_001_0000.nii.gz",
                            "unreadable"),
    "annotated organ absent": (lambda p: _rewrite(p, _drop_organ_b), "labelsTr/case_000.nii.gz", "no voxels"),
}

CASES_JSON = {
    "organ present but not listed": ({"case_000": {"annotated": ["organA"]}}, "case_000.nii.gz",
                                     "cases.json lists only ['organA']"),
    "unknown organ name": ({"case_001": {"annotated": ["liver"]}}, "cases.json", "unknown organs ['liver']"),
    "labeled split without a label": ({"case_002": {"split": "labeled"}}, "cases.json", "no label file"),
}


def _site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", n_labeled=2, n_unlabeled=1, n_test=0)


def _expect_one_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output  # no empty progress bar either
    for fragment in fragments:
        assert fragment in lines[0], result.output


def _amplify(site: Path, out: Path):
    return runner.invoke(app, ["amplify", "--site", str(site), "--out", str(out)])


def _train(site: Path, out: Path):
    return runner.invoke(app, ["train", "--site", str(site), "--out", str(out), "--steps", "1"])


@pytest.mark.parametrize("command", ["amplify", "train"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_site_file_stops_amplify_and_train_before_any_work(tmp_path, command, breakage):
    site = _site(tmp_path)
    break_it, rel, message = BREAKAGES[breakage]
    break_it(site / rel)
    out = tmp_path / "out"
    result = (_amplify if command == "amplify" else _train)(site, out)
    _expect_one_line(result, rel.split("/")[-1], message)
    assert not out.exists()


@pytest.mark.parametrize("command", ["amplify", "train"])
@pytest.mark.parametrize("case", list(CASES_JSON))
def test_an_inconsistent_cases_json_stops_amplify_and_train(tmp_path, command, case):
    site = _site(tmp_path)
    meta, named, message = CASES_JSON[case]
    (site / "cases.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    result = (_amplify if command == "amplify" else _train)(site, out)
    _expect_one_line(result, named, message)
    assert not out.exists()


def test_amplify_checks_every_site_before_the_first_runs(tmp_path):
    good, bad = write_site(tmp_path / "good", n_test=0), write_site(tmp_path / "bad", n_test=0)
    _truncate(bad / "imagesTr" / "case_002_0000.nii.gz")
    out = tmp_path / "out"
    result = runner.invoke(app, ["amplify", "--site", str(good), "--site", str(bad), "--out", str(out)])
    _expect_one_line(result, "bad/imagesTr/case_002_0000.nii.gz", "truncated")
    assert not out.exists()  # not even the good site's folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    from fadal.config import TrainConfig
    from fadal.model.infer import save_checkpoint
    from fadal.model.net import build_network

    plan = tiny_plan()
    return save_checkpoint(build_network(3, plan.network), tmp_path / "model.pt", LABELS, plan, TrainConfig())


@pytest.mark.parametrize("breakage", ["truncated", "truncated raw", "not an image"])
def test_predict_refuses_a_broken_input_before_writing_anything(tmp_path, checkpoint, breakage):
    site = _site(tmp_path)
    good = site / "imagesTr" / "case_000_0000.nii.gz"
    bad = site / "imagesTr" / "case_001_0000.nii.gz"
    if breakage == "truncated":
        _truncate(bad)
    elif breakage == "truncated raw":
        raw = bad.with_name("case_001_0000.nii")
        sitk.WriteImage(sitk.ReadImage(str(bad)), str(raw))
        bad.unlink()
        bad = raw
        _truncate(bad)
    else:
        bad.write_text("a text file named like a scan")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(good), str(bad), "--model", str(checkpoint), "--out", str(out)])
    _expect_one_line(result, bad.name, "truncated" if breakage.startswith("truncated") else "unreadable")
    assert not out.exists()  # the good first input was not segmented either


def test_predict_with_a_file_that_is_not_a_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "model.pt").write_text("a half-copied file")
    ct = _site(tmp_path) / "imagesTr" / "case_000_0000.nii.gz"
    result = runner.invoke(app, ["predict", str(ct), "--model", str(tmp_path / "model.pt"), "--out",
                                 str(tmp_path / "out")])
    _expect_one_line(result, "model.pt: not a FADAL model checkpoint")
    assert not (tmp_path / "out").exists()
