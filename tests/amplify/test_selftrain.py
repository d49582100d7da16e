"""Self-training: the refinement rule, QC, and one real round on a tiny site."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fadal.amplify.geometry import grid_world_points
from fadal.amplify.qc import OrganReference
from fadal.amplify.selftrain import SelfTrainSite, check_refined, refine_label, selftrain
from fadal.amplify.synthesize import LearnedTransform, SyntheticPairs, prepare, world_to_grid
from fadal.config import AugmentConfig, SelfTrainConfig, TrainConfig
from fadal.records import PreprocessConfig
from fadal.data.io import read_image, same_geometry
from fadal.data.site import load_site
from fadal.model.engine import make_sampler
from fadal.errors import FadalInputError
from fadal.model.patches import site_training_items
from fadal.records import FusionProvenance, QCVerdict, SelfTrainProvenance
from fadal.data.io import write_record
from fadal_testing import tiny_plan

PRE = PreprocessConfig(spacing_mm=(4.0, 4.0, 4.0))
PLAN = tiny_plan((4, 8), spacing_mm=4.0)
TINY = TrainConfig(lr=1e-2, num_threads=1)


def test_refine_label_keeps_agreement_and_confident_model_voxels():
    fused = np.array([0, 1, 1, 2, 2, 0])
    model = np.array([0, 1, 2, 1, 2, 3])  # organ 3 is not known here
    conf = np.array([0.6, 0.5, 0.95, 0.6, 0.99, 0.99], dtype=np.float32)
    label, c, stats = refine_label(model, conf, known=[1, 2], fused_label=fused, model_confidence=0.9)
    assert label.tolist() == [0, 1, 2, 2, 2, 0]  # agree, agree, model sure, dropped (fusion kept), agree, unknown->0
    assert c.tolist() == [1.0, 1.0, np.float32(0.95), 0.0, 1.0, 1.0]
    assert stats["dropped_fraction"] == round(1 / 6, 4)
    label, c, _ = refine_label(model, conf, known=[1, 2], model_confidence=0.9)  # no fusion: model-only rule
    assert label.tolist() == [0, 1, 2, 1, 2, 0] and (c > 0).tolist() == [False, False, True, False, True, True]


def test_check_refined_reverts_drifting_organs_to_the_fusion_and_demotes_what_qc_flags():
    cfg = SelfTrainConfig()
    names = {1: "a", 2: "b"}
    fused = np.zeros((6, 6, 6), np.uint8)
    fused[1:3, 1:5, 1:5] = 1  # 32 voxels
    fused[4:6, 1:5, 1:5] = 2
    conf = np.ones(fused.shape, np.float32)
    label, c, ok = check_refined(fused, conf, [1, 2], names, fused, cfg)
    assert ok.accepted and ok.kept == ["a", "b"] and not ok.reverted
    # The network lost most of organ a and grew it into background elsewhere: a goes back to the fusion.
    shrunk = fused.copy()
    shrunk[1:3, 1:5, 2:5] = 0  # organ a keeps a quarter of its fused volume
    shrunk[0, 0, 0] = 1  # and claims one voxel the fusion calls background
    fused_conf = np.full(fused.shape, 0.8, np.float32)
    label, c, one = check_refined(shrunk, conf, [1, 2], names, fused, cfg, fused_conf=fused_conf)
    assert one.accepted and one.reverted == ["a"] and one.kept == ["a", "b"] and not one.demoted
    assert "a:" in one.reasons[0] and "fusion" in one.reasons[0]
    assert ((label == 1) == (fused == 1)).all()  # exactly the fused organ again
    assert np.allclose(c[fused == 1], 0.8) and c[0, 0, 0] == 0  # fusion's confidence; the stray voxel ignored
    assert (label[fused == 2] == 2).all() and (c[fused == 2] == 1).all()  # organ b untouched
    # What the amplification QC flags (here: an organ 20x the atlases' volume) is demoted to unknown,
    # and a scan with most organs flagged is rejected.
    tiny_ref = {1: OrganReference([2.0]), 2: OrganReference([2.0])}  # the atlases' organs: 2 ml; these: 32 ml
    label, c, bad = check_refined(fused, conf, [1, 2], names, fused, cfg, reference=tiny_ref)
    assert bad.demoted == ["a", "b"] and not bad.accepted
    assert not label.any() and not c[fused > 0].any()


def _site_with_fusion(tiny_site):
    """tiny_site (2 labeled, 1 unlabeled) + a second unlabeled scan; fusion outputs for both, the
    second one rejected by QC. The phantom's organs do not depend on its noise seed, so a labeled
    case's label map stands in for a good fused label."""
    shutil.copy(tiny_site / "imagesTr" / "case_000_0000.nii.gz", tiny_site / "imagesTr" / "case_009_0000.nii.gz")
    amp = tiny_site.parent / "amplified"
    for case, accepted in (("case_002", True), ("case_009", False)):
        (amp / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_site / "labelsTr" / "case_000.nii.gz", amp / "labels" / f"{case}.nii.gz")
        write_record(fusion_provenance(case, accepted, ["organA", "organB"]), amp / "provenance" / f"{case}.json")
    return load_site(tiny_site), amp


def fusion_provenance(case: str, accepted: bool, organs: list[str]) -> FusionProvenance:
    """A hand-made amplification sidecar: the scan's fused organs, accepted or rejected by QC."""
    qc = QCVerdict(accepted=accepted, reasons=[] if accepted else ["test"], organs={},
                   kept=organs if accepted else [], demoted=[])
    return FusionProvenance(case=case, image=f"{case}_0000.nii.gz", status="accepted" if accepted else "rejected",
                            reasons=qc.reasons, organs_fused=organs if accepted else [], organs_demoted=[],
                            fusion_method="majority", atlases=[], registration_seconds=0.0, fusion_seconds=0.0,
                            config={}, qc=qc, organs_not_fused=[], organs={}, mean_confidence=None,
                            mean_confidence_foreground=None)


def test_a_malformed_provenance_is_an_error_naming_the_file(tiny_site):
    site, amp = _site_with_fusion(tiny_site)
    (amp / "provenance" / "case_002.json").write_text(json.dumps({"case": "case_002", "qc": {"accept": True}}))
    with pytest.raises(FadalInputError, match=r"case_002\.json: not a valid provenance file"):
        site_training_items(site, amp, True)
    (amp / "provenance" / "case_002.json").write_text('{"case": "case_0')  # half written
    with pytest.raises(FadalInputError, match=r"case_002\.json: not a valid provenance file"):
        site_training_items(site, amp, True)


def test_selftrain_one_round_writes_refined_labels_in_scan_geometry(tiny_site, tmp_path):
    torch.set_num_threads(1)
    site, amp = _site_with_fusion(tiny_site)
    assert [c.case_id for c in site.unlabeled] == ["case_002", "case_009"]
    # The QC-rejected fused label never reaches training.
    assert len(site_training_items(site, amp, True)) == 3
    out = tmp_path / "selftrain"
    result = selftrain([SelfTrainSite(site, amp)], out, TINY, PLAN, SelfTrainConfig(rounds=1), steps=6)
    assert [h["round"] for h in result.rounds] == [0, 1] and (out / "model.pt").exists()
    refined = out / "round_1" / site.name
    image = read_image(site.unlabeled[0].image)
    label, conf = read_image(refined / "labels" / "case_002.nii.gz"), read_image(refined / "confidence" / "case_002.nii.gz")
    assert same_geometry(label, image) is None and same_geometry(conf, image) is None
    c = sitk.GetArrayViewFromImage(conf)
    assert c.min() >= 0.0 and c.max() <= 1.0
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1, 2}
    prov = json.loads((refined / "provenance" / "case_002.json").read_text())
    assert prov["source"] == "selftrain" and prov["status"] in ("accepted", "rejected")
    assert set(prov["organs_fused"]) | set(prov["organs_demoted"]) == {"organA", "organB"}
    assert not (refined / "labels" / "case_009.nii.gz").exists()  # fusion QC rejected it: not refined
    summary = json.loads((refined / "selftrain.json").read_text())
    assert summary["per_case"]["case_009"] == {"skipped": "fusion QC rejected this scan"}
    assert SelfTrainProvenance.model_validate_json((refined / "provenance" / "case_002.json").read_text()).round == 1


def test_patches_mix_in_synthetic_pairs(tiny_site):
    """Synthetic pairs are drawn in proportion to their length and patched like the real volumes."""
    site = load_site(tiny_site)
    case = site.labeled[0]
    atlas = prepare(case.case_id, case.image, PRE, case.label, site.annotated_ids(case))
    # A hand-made "learned" transform: the identity on the atlas's own grid (no registration needed).
    grid = world_to_grid(torch.as_tensor(grid_world_points(atlas.image.shape, atlas.affine)), atlas.affine,
                         atlas.image.shape)
    t = LearnedTransform("self", grid.half(), atlas.affine, torch.zeros_like(atlas.image).half(), 0.0, 1.0, 1.0, 0.0)
    pairs = SyntheticPairs([atlas], [[t]], site.num_classes, length=50)

    class Counted(torch.utils.data.Dataset):
        calls = 0

        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            Counted.calls += 1
            return pairs[i]

    cfg = TrainConfig(augment=AugmentConfig(enabled=False))
    sampler = make_sampler(site_training_items(site), PLAN, cfg, site.num_classes, extra=[Counted()])
    assert len(sampler) == 52  # 2 real volumes + 50 synthetic draws
    for _ in range(40):
        patch = sampler.draw()
        assert patch["image"].shape == (1, *PLAN.patch_size) and patch["known"].shape == (site.num_classes,)
        assert set(torch.unique(patch["label"]).tolist()) <= {0, 1, 2}
    assert Counted.calls >= 30  # 50 of 52 items are synthetic
