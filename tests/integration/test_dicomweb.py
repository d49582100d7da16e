"""`fadal predict --dicomweb` against a real Orthanc: the CT comes from the PACS (WADO-RS), the SEG goes back
(STOW-RS) and matches, voxel for voxel, the label map written to disk; bad inputs are one clear line each."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from dicomweb_client.api import DICOMwebClient
from orthanc_pacs import stamp_example_series
from typer.testing import CliRunner

from fadal.cli import app

runner = CliRunner()


def _segs(server, study: str) -> list:
    client = DICOMwebClient(server.dicomweb)
    found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    series = [s["0020000E"]["Value"][0] for s in found]
    return [ds for uid in series for ds in client.retrieve_series(study, uid, media_types=(("application/dicom", "*"),))]




def test_predict_through_dicomweb_stores_a_seg_matching_the_label_map(orthanc, pacs_checkpoint, tmp_path):
    uids = orthanc.uploaded
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", uids["study"],
                                 "--model", str(pacs_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"SEG" in result.output and "stored" in result.output
    case = out / uids["series"]
    summary = json.loads((case / "summary.json").read_text())
    assert summary["pacs"]["ct_series"] == uids["series"]
    label = sitk.ReadImage(str(out / f"{uids['series']}.nii.gz"))
    assert (case / "meshes").is_dir() and (case / "views" / "overlay.png").is_file()
    seg_nrrd = sitk.ReadImage(str(case / f"{uids['series']}.seg.nrrd"))  # the Slicer files of the case
    assert np.array_equal(sitk.GetArrayFromImage(seg_nrrd), sitk.GetArrayFromImage(label))
    assert seg_nrrd.GetMetaData("Segment0_Name") == "liver"
    scene = (case / "scene.mrml").read_text()
    assert "source_dicom/" in scene and f"{uids['series']}.seg.nrrd" in scene and "liver.vtp" in scene

    segs = _segs(orthanc, uids["study"])
    assert len(segs) == 1
    seg = hd.seg.Segmentation.from_dataset(segs[0])
    assert str(seg.SeriesInstanceUID) == summary["pacs"]["seg_series"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20
    assert seg.FrameOfReferenceUID == uids["frame"]
    labels = json.loads((Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalseg_example" /
                         "labels.json").read_text())["labels"]
    values = {k: i for i, k in enumerate(["background", *labels])}
    arr = sitk.GetArrayFromImage(label)
    present = {name for name, v in values.items() if v and (arr == v).any()}
    assert present and {s.SegmentLabel for s in seg.SegmentSequence} == present
    painted = np.zeros(arr.shape, np.int32)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ident = fg.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence  # one segment: shared
        number = int(ident[0].ReferencedSegmentNumber)
        i, j, k = label.TransformPhysicalPointToIndex([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        assert (i, j) == (0, 0)
        painted[k][frame > 0] = values[seg.SegmentSequence[number - 1].SegmentLabel]
    assert np.array_equal(painted, arr.astype(np.int32))  # voxel for voxel
    s = summary["seconds"]
    print(f"\nbenchmark: DICOMweb retrieve+segment+store of the 20-slice example series after the model is loaded: "
          f"{s['pacs_total']:.2f} s (retrieve {s['retrieve']:.2f}, network {s['network']:.2f}, "
          f"meshes {s.get('meshes', 0):.2f}, views {s.get('views', 0):.2f}, SEG {s.get('dicom_seg', 0):.2f}, "
          f"store {s['store']:.2f}; target <= 10 s)")
    assert s["pacs_total"] < 60


def _one_line_error(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output and lines[0].startswith("error:"), result.output
    for e in expected:
        assert e in text, result.output
    return text


def test_bad_pacs_inputs_are_one_clear_line_each(orthanc, orthanc_factory, pacs_checkpoint, tmp_path, monkeypatch):
    model = ["--model", str(pacs_checkpoint), "--out", str(tmp_path / "o")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = runner.invoke(app, ["predict", "--dicomweb", f"http://127.0.0.1:{closed}/dicom-web", "--study", "1.2.3", *model])
    _one_line_error(r, "PACS unreachable")

    r = runner.invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", "1.2.3.4", *model])
    _one_line_error(r, "study 1.2.3.4 not found")

    mr = stamp_example_series(tmp_path / "mr", "MR research", tag="mr", modality="MR")
    orthanc.upload(sorted(Path(mr["folder"]).iterdir()))
    r = runner.invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", mr["study"], *model])
    _one_line_error(r, f"study {mr['study']} has no CT series (modalities: MR)")

    gap = stamp_example_series(tmp_path / "gap", "CT research", tag="gap", drop_slice=10)
    orthanc.upload(sorted(Path(gap["folder"]).iterdir()))
    r = runner.invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", gap["study"], *model])
    _one_line_error(r, "uneven slice spacing", "missing slices?")

    locked = orthanc_factory("locked", users={"fadal": "pacs-secret-1"})
    r = runner.invoke(app, ["predict", "--dicomweb", locked.dicomweb, "--study", "1.2.3", *model])
    _one_line_error(r, "HTTP 401 Unauthorized", "FADAL_DICOMWEB_PASSWORD")
    monkeypatch.setenv("FADAL_DICOMWEB_PASSWORD", "wrong-secret-2")
    r = runner.invoke(app, ["predict", "--dicomweb", locked.dicomweb, "--study", "1.2.3", "--user", "fadal", *model])
    text = _one_line_error(r, "HTTP 401 Unauthorized", "credentials were refused")
    assert "wrong-secret-2" not in text
    monkeypatch.setenv("FADAL_DICOMWEB_PASSWORD", "pacs-secret-1")  # the right one: through to "not found"
    r = runner.invoke(app, ["predict", "--dicomweb", locked.dicomweb, "--study", "1.2.3", "--user", "fadal", *model])
    text = _one_line_error(r, "study 1.2.3 not found")
    assert "pacs-secret-1" not in text
