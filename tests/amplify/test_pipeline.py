"""Amplification of a tiny synthetic site end to end (real registrations, resumable outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.amplify.pipeline import amplify_site
from fadal.config import AmplifyConfig
from fadal.errors import FadalInputError
from fadal.records import AmplificationSummary, FusionProvenance

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG, on importing itk

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spine": 3}


def _write_site(root, phantom, cases_json=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    scans = {
        "a001": phantom(44, 4.5, shift_mm=(6.0, -4.0, 3.0), warp_mm=4.0, flip=True, seed=2),
        "a002": phantom(40, 5.0, shift_mm=(-5.0, 3.0, -4.0), warp_mm=3.0, seed=3),
        "u001": phantom(48, 4.0, seed=1),
    }
    drawn = {case: info["annotated"] for case, info in (cases_json or {}).items() if "annotated" in info}
    for case, (img, lab) in scans.items():
        sitk.WriteImage(img, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        if case.startswith("a"):
            if case in drawn:  # a partial annotation: the organs not drawn are not in the label file
                arr = sitk.GetArrayFromImage(lab)
                arr[~np.isin(arr, [0] + [LABELS[o] for o in drawn[case] if o in LABELS])] = 0
                partial = sitk.GetImageFromArray(arr)
                partial.CopyInformation(lab)
                lab = partial
            sitk.WriteImage(lab, str(root / "labelsTr" / f"{case}.nii.gz"))
    if cases_json is not None:
        (root / "cases.json").write_text(json.dumps(cases_json))
    return scans


def test_amplify_reads_the_site_with_load_site(tmp_path, phantom, fast_cfg, one_itk_thread):
    """Atlases and targets are load_site's labeled and unlabeled cases: a held-out case is never an atlas,
    a case cases.json calls unlabeled is a target even with a label file, a bad organ name stops the run."""
    site, out = tmp_path / "site", tmp_path / "out"
    _write_site(site, phantom, {"a001": {"split": "test"}, "a002": {"split": "unlabeled"}})
    with pytest.raises(FadalInputError, match="no labeled case"):
        amplify_site(site, out, AmplifyConfig(registration=fast_cfg(workers=1)))
    (site / "cases.json").write_text(json.dumps({"a002": {"annotated": ["lung"]}}))
    with pytest.raises(FadalInputError, match="lung"):
        amplify_site(site, out, AmplifyConfig(registration=fast_cfg(workers=1)))
    assert not out.exists()  # checked before any work: nothing written
    (site / "cases.json").write_text(json.dumps({"a002": {"split": "unlabeled"}}))
    summary = amplify_site(site, out, AmplifyConfig(registration=fast_cfg(workers=1)))
    assert summary.atlases == ["a001"] and list(summary.per_case) == ["a002", "u001"]


def _provenance(out, case) -> FusionProvenance:
    return FusionProvenance.model_validate_json((out / "provenance" / f"{case}.json").read_text())


def test_amplify_site_outputs_and_resumes(tmp_path, phantom, fast_cfg, dice_score, one_itk_thread):
    site, out = tmp_path / "site", tmp_path / "out"
    # a002 did not draw the spine: the spine comes from a001 alone, and a002's 0 there is no vote.
    scans = _write_site(site, phantom, {"a002": {"split": "labeled", "annotated": ["liver", "kidney"]}})
    cfg = AmplifyConfig(registration=fast_cfg(workers=1))
    events = []
    summary = amplify_site(site, out, cfg, progress=lambda *e: events.append(e))
    assert summary.n_scans == 1 and summary.n_atlases == 2 and summary.n_registrations_this_run == 2
    assert ("register", 2, 2) in events and ("fuse", 1, 1) in events

    image, truth = scans["u001"]
    label = sitk.ReadImage(str(out / "labels" / "u001.nii.gz"))
    conf = sitk.ReadImage(str(out / "confidence" / "u001.nii.gz"))
    for im in (label, conf):
        assert im.GetSize() == image.GetSize()
        np.testing.assert_allclose(im.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(im.GetOrigin(), image.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(im.GetDirection(), image.GetDirection(), atol=1e-9)
    assert label.GetPixelID() == sitk.sitkUInt8 and conf.GetPixelID() == sitk.sitkFloat32
    c = sitk.GetArrayFromImage(conf)
    assert c.min() >= 0 and c.max() <= 1
    fused = sitk.GetArrayFromImage(label)
    assert dice_score(fused, sitk.GetArrayFromImage(truth)) > 0.75
    assert (fused == 3).sum() > 0  # spine, annotated by one atlas only, survives fusion

    prov = _provenance(out, "u001")
    assert [a.case for a in prov.atlases] == ["a001", "a002"]
    assert [a.cached for a in prov.atlases] == [False, False]
    assert prov.atlases[1].annotated == ["liver", "kidney"]
    assert all(a.metric_after > a.metric_before for a in prov.atlases)
    assert prov.organs_fused == ["liver", "kidney", "spine"] and prov.fusion_method == "majority"
    assert set(prov.organs) == {"liver", "kidney", "spine"}
    written = AmplificationSummary.model_validate_json((out / "fusion.json").read_text())
    assert written == summary and written.per_case["u001"].mean_confidence > 0.5

    # Done cases are skipped; an unfinished case (no provenance) reuses the cached registrations.
    again = amplify_site(site, out, cfg)
    assert again.n_amplified_this_run == 0 and again.per_case == summary.per_case
    (out / "provenance" / "u001.json").unlink()
    third = amplify_site(site, out, cfg)
    assert third.n_amplified_this_run == 1 and third.n_registrations_this_run == 0
    assert [a.cached for a in _provenance(out, "u001").atlases] == [True, True]


def test_failed_atlas_excluded_and_unregistrable_scan_rejected(tmp_path, phantom, fast_cfg, one_itk_thread):
    """a003's scan is noise (its registration must fail and be left out of u001's fusion); u002 is no
    body at all (every atlas fails on it: rejected, no label file, skipped by training)."""
    from fadal.data.site import load_site
    from fadal.demo import amplification_row
    from fadal.model.patches import site_training_items

    site, out = tmp_path / "site", tmp_path / "out"
    _write_site(site, phantom)
    rng = np.random.default_rng(0)
    good, good_lab = phantom(40, 5.0, shift_mm=(-5.0, 3.0, -4.0), warp_mm=3.0, seed=3)
    noise = sitk.GetImageFromArray(rng.uniform(-1000, 1000, size=(40, 40, 40)).astype(np.int16))
    noise.CopyInformation(good)
    sitk.WriteImage(noise, str(site / "imagesTr" / "a003_0000.nii.gz"))
    sitk.WriteImage(good_lab, str(site / "labelsTr" / "a003.nii.gz"))
    cube = np.full((32, 32, 32), -1000, np.int16)
    cube[12:18, 12:18, 12:18] = 900  # a small bone-like block in air: not a body
    junk = sitk.GetImageFromArray(cube)
    junk.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(junk, str(site / "imagesTr" / "u002_0000.nii.gz"))

    summary = amplify_site(site, out, AmplifyConfig(registration=fast_cfg(workers=1)))
    prov = _provenance(out, "u001")
    status = {a.case: a.status for a in prov.atlases}
    assert status == {"a001": "used", "a002": "used", "a003": "failed"}
    bad = next(a for a in prov.atlases if a.case == "a003")
    assert bad.reason.startswith("registration failed:") and "NCC" in bad.reason
    assert prov.status == "accepted" and (out / "labels" / "u001.nii.gz").exists()

    rejected = _provenance(out, "u002")
    assert rejected.status == "rejected" and rejected.reasons == ["all 3 atlas registrations failed"]
    assert all(a.status == "failed" for a in rejected.atlases)
    assert not (out / "labels" / "u002.nii.gz").exists() and not (out / "confidence" / "u002.nii.gz").exists()
    assert summary.n_scans == 2 and summary.n_accepted == 1 and summary.n_rejected == 1
    assert [r.model_dump() for r in summary.rejected] == [{"case": "u002", "reasons": ["all 3 atlas registrations failed"]}]
    assert set(summary.mean_confidence) == {"liver", "kidney", "spine"}

    items = site_training_items(load_site(site, validate=False), out, use_amplified=True)
    assert [i["label"] for i in items if i["label"].startswith(str(out))] == [str(out / "labels" / "u001.nii.gz")]
    assert items[-1]["known"] == [1, 2, 3]  # organs_fused of u001

    row = amplification_row(summary)
    assert (row["scans"], row["accepted"], row["rejected"]) == (2, 1, 1)
    assert row["rejections"] == ["u002: all 3 atlas registrations failed"]


def test_atlas_selection_excludes_failures_and_keeps_the_best_top_k(tmp_path):
    from fadal.amplify.pipeline import _select_atlases
    from fadal.amplify.result import RegistrationResult
    from fadal.config import FusionConfig

    def result(ncc, body_dice=0.95, error=None):
        return RegistrationResult(fixed=tmp_path, moving=tmp_path, warped_label=tmp_path, metric_before=0.0,
                                  metric_after=ncc, seconds=1.0, cached=False, body_dice=body_dice, overlap=1.0,
                                  error=error)

    # The best working atlas has NCC 0.8: min_ncc_ratio 0.8 fails an atlas below 0.64 on this scan.
    results = [result(0.7), result(0.1), result(0.8), result(0.75, body_dice=0.2), result(0.72), result(0.9, error="x"),
               result(0.6)]
    chosen, why = _select_atlases(results, AmplifyConfig())
    assert chosen == [2, 4, 0] and set(why) == {1, 3, 5, 6}
    assert "NCC 0.100" in why[1] and "body-mask Dice" in why[3] and why[5] == "registration failed: x"
    assert "min_ncc_ratio" in why[6]
    chosen, why = _select_atlases(results, AmplifyConfig(fusion=FusionConfig(top_k=2)))
    assert chosen == [2, 4] and why[0].startswith("not selected")
