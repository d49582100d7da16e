"""The synthetic multi-site phantom: layout, determinism, geometry, anatomy and orientation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fadal.data.io import same_geometry
from fadal.data.phantom import (
    DEFAULT_SCANNERS,
    PARTIAL_ANNOTATED,
    PHANTOM_LABELS,
    ScannerProfile,
    make_phantom,
    make_subject,
    scanner_for_site,
)

ORGANS = [name for name in PHANTOM_LABELS if name != "background"]
SITES = ["A", "B", "C"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    paths = make_phantom(out, sites=3, labeled=1, unlabeled=1, test=1, seed=0, partial_sites=1)
    assert paths == [out / f"site_{s}" for s in SITES]
    return out


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def _pairs(root: Path):
    """(site letter, case id, image path, label path) for every labelled scan."""
    for s in SITES:
        site = root / f"site_{s}"
        yield s, f"ph{s}_000", site / "imagesTr" / f"ph{s}_000_0000.nii.gz", site / "labelsTr" / f"ph{s}_000.nii.gz"
        yield s, f"ph{s}_002", site / "imagesTs" / f"ph{s}_002_0000.nii.gz", site / "labelsTs" / f"ph{s}_002.nii.gz"


def _world_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]]))


def test_layout_and_json(phantom: Path):
    for i, s in enumerate(SITES):
        site = phantom / f"site_{s}"
        ds = json.loads((site / "dataset.json").read_text())
        assert ds["name"] == f"FADAL phantom site {s}"
        assert ds["channel_names"] == {"0": "CT"}
        assert ds["labels"] == PHANTOM_LABELS
        assert ds["numTraining"] == 2
        assert ds["file_ending"] == ".nii.gz"
        assert ds["scanner"]["name"] == DEFAULT_SCANNERS[i].name
        assert ds["scanner"]["spacing_mm"] == list(DEFAULT_SCANNERS[i].spacing_mm)
        assert len(ds["scanner"]["direction"]) == 9
        assert isinstance(ds["description"], str) and ds["description"]

        cases = json.loads((site / "cases.json").read_text())
        assert list(cases) == [f"ph{s}_000", f"ph{s}_001", f"ph{s}_002"]
        assert [c["split"] for c in cases.values()] == ["labeled", "unlabeled", "test"]
        assert all(c["site"] == s for c in cases.values())
        assert cases[f"ph{s}_001"]["annotated"] == []
        assert cases[f"ph{s}_002"]["annotated"] == ORGANS

        listing = {sub: sorted(p.name for p in (site / sub).iterdir())
                   for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
        assert listing == {
            "imagesTr": [f"ph{s}_000_0000.nii.gz", f"ph{s}_001_0000.nii.gz"],
            "labelsTr": [f"ph{s}_000.nii.gz"],
            "imagesTs": [f"ph{s}_002_0000.nii.gz"],
            "labelsTs": [f"ph{s}_002.nii.gz"],
        }


def test_partial_site_lacks_undrawn_organs(phantom: Path):
    for s in ("A", "B"):
        cases = json.loads((phantom / f"site_{s}" / "cases.json").read_text())
        assert cases[f"ph{s}_000"]["annotated"] == ORGANS
    cases = json.loads((phantom / "site_C" / "cases.json").read_text())
    assert cases["phC_000"]["annotated"] == list(PARTIAL_ANNOTATED) == ["liver", "kidney_right", "kidney_left", "aorta"]
    assert cases["phC_002"]["annotated"] == ORGANS
    _, lab = _read(phantom / "site_C" / "labelsTr" / "phC_000.nii.gz")
    assert set(np.unique(lab).tolist()) == {0} | {PHANTOM_LABELS[o] for o in PARTIAL_ANNOTATED}
    _, full = _read(phantom / "site_C" / "labelsTs" / "phC_002.nii.gz")
    assert set(np.unique(full).tolist()) == set(PHANTOM_LABELS.values())
    ds = json.loads((phantom / "site_C" / "dataset.json").read_text())
    assert "only" in ds["description"]


def test_geometry_and_dtypes(phantom: Path):
    sizes = {}
    for s, _, img_path, lab_path in _pairs(phantom):
        image, label = sitk.ReadImage(str(img_path)), sitk.ReadImage(str(lab_path))
        assert same_geometry(image, label) is None
        assert image.GetPixelID() == sitk.sitkInt16
        assert label.GetPixelID() == sitk.sitkUInt8
        assert all(40 <= n <= 96 for n in image.GetSize()), image.GetSize()
        assert np.allclose(image.GetSpacing(), DEFAULT_SCANNERS[SITES.index(s)].spacing_mm)
        sizes.setdefault(s, set()).add(image.GetSize())
    assert all(len(v) == 1 for v in sizes.values())  # one grid per site
    assert len({next(iter(v)) for v in sizes.values()}) == 3  # ... and a different one at each site
    dir_a = sitk.ReadImage(str(phantom / "site_A" / "imagesTr" / "phA_000_0000.nii.gz")).GetDirection()
    dir_c = sitk.ReadImage(str(phantom / "site_C" / "imagesTr" / "phC_000_0000.nii.gz")).GetDirection()
    assert np.allclose(dir_a, np.eye(3).ravel())
    assert np.allclose(dir_c, [-1, 0, 0, 0, -1, 0, 0, 0, 1])


def test_organ_volumes_plausible(phantom: Path):
    for s, case, img_path, lab_path in _pairs(phantom):
        if s == "C" and case == "phC_000":
            continue  # partially annotated
        label, lab = _read(lab_path)
        assert set(np.unique(lab).tolist()) <= set(PHANTOM_LABELS.values())
        ml = float(np.prod(label.GetSpacing())) / 1000.0
        vol = {o: float((lab == PHANTOM_LABELS[o]).sum()) * ml for o in ORGANS}
        assert all(v > 0 for v in vol.values()), (case, vol)
        assert max(vol, key=vol.get) == "liver", (case, vol)
        assert 800 <= vol["liver"] <= 2500, (case, vol)
        assert 80 <= vol["kidney_right"] <= 300 and 80 <= vol["kidney_left"] <= 300, (case, vol)
        assert 60 <= vol["spleen"] <= 600, (case, vol)
        assert 100 <= vol["stomach"] <= 1000, (case, vol)
        assert 15 <= vol["pancreas"] <= 150, (case, vol)
        assert 20 <= vol["aorta"] <= 250, (case, vol)


def test_hounsfield_plausible(phantom: Path):
    aorta_mean = {}
    for s, case, img_path, lab_path in _pairs(phantom):
        _, img = _read(img_path)
        _, lab = _read(lab_path)
        # Air in the in-plane corners of the field of view (outside the elliptical body).
        corners = np.concatenate([img[:, :6, :6].ravel(), img[:, :6, -6:].ravel(),
                                  img[:, -6:, :6].ravel(), img[:, -6:, -6:].ravel()])
        assert -1040 <= np.median(corners) <= -960, (case, np.median(corners))
        body = img > -500
        assert 0.3 < body.mean() < 0.9
        # Bone: bright voxels exist, outside every organ.
        bone = (img > 300) & (lab == 0)
        assert bone.sum() > 100, case
        assert np.percentile(img[body], 99.5) > 300
        if s == "A":  # scanner A applies no HU change (scale 1, offset 0)
            assert 20 <= img[lab == PHANTOM_LABELS["liver"]].mean() <= 120
            assert -150 <= np.median(img[body & (lab == 0)]) <= 100
        if case.endswith("_002"):
            aorta_mean[s] = float(img[lab == PHANTOM_LABELS["aorta"]].mean())
    # Site C is arterial phase: the aorta is much brighter than at the other sites.
    assert aorta_mean["C"] > 180 and aorta_mean["C"] > aorta_mean["A"] + 80 and aorta_mean["C"] > aorta_mean["B"] + 80


def test_orientation_encoded_in_world_coordinates(phantom: Path):
    """ITK world is LPS: +x is patient left, +y posterior. Anatomy must agree at every site,
    including site C whose voxels are stored x/y-flipped."""
    liver_index_x = {}
    for s, case, img_path, lab_path in _pairs(phantom):
        image, img = _read(img_path)
        _, lab = _read(lab_path)
        c = {o: _world_centroid(image, lab == PHANTOM_LABELS[o]) for o in ("liver", "kidney_right", "kidney_left",
                                                                          "aorta")}
        body = _world_centroid(image, img > -500)
        spine = _world_centroid(image, (img > 300) & (lab == 0))
        assert c["liver"][0] < body[0] - 20, case  # liver on the patient's right
        assert c["kidney_right"][0] < body[0] < c["kidney_left"][0], case
        assert c["aorta"][1] < spine[1], case  # aorta anterior to the spine
        assert spine[1] > body[1] + 10, case  # spine in the posterior half
        assert abs(spine[0] - body[0]) < 25, case  # ... near the midline
        if not (s == "C" and case == "phC_000"):
            spleen = _world_centroid(image, lab == PHANTOM_LABELS["spleen"])
            assert c["liver"][0] < spleen[0], case
            assert spleen[1] > c["liver"][1], case  # spleen lies posterior to the liver's centre
        if case.endswith("_002"):
            liver_index_x[s] = np.argwhere(lab == PHANTOM_LABELS["liver"]).mean(axis=0)[2] / lab.shape[2]
    # In index space the liver is on the low-x side at site A but the high-x side at site C.
    assert liver_index_x["A"] < 0.5 < liver_index_x["C"]


def test_deterministic_and_independent_of_counts(phantom: Path, tmp_path: Path):
    scanner = DEFAULT_SCANNERS[0]
    a_img, a_lab = make_subject(np.random.default_rng([0, 0, 0]), scanner)
    b_img, b_lab = make_subject(np.random.default_rng([0, 0, 0]), scanner)
    assert np.array_equal(sitk.GetArrayFromImage(a_img), sitk.GetArrayFromImage(b_img))
    assert np.array_equal(sitk.GetArrayFromImage(a_lab), sitk.GetArrayFromImage(b_lab))
    c_img, c_lab = make_subject(np.random.default_rng([1, 0, 0]), scanner)
    assert not np.array_equal(sitk.GetArrayFromImage(a_img), sitk.GetArrayFromImage(c_img))
    assert not np.array_equal(sitk.GetArrayFromImage(a_lab), sitk.GetArrayFromImage(c_lab))

    # A single-site, single-scan phantom with the same seed reproduces the same scan on disk.
    make_phantom(tmp_path, sites=1, labeled=1, unlabeled=0, test=0, seed=0, partial_sites=0)
    for sub, name in (("imagesTr", "phA_000_0000.nii.gz"), ("labelsTr", "phA_000.nii.gz")):
        one, big = _read(tmp_path / "site_A" / sub / name), _read(phantom / "site_A" / sub / name)
        assert np.array_equal(one[1], big[1])
        assert same_geometry(one[0], big[0]) is None
    _, disk = _read(phantom / "site_A" / "imagesTr" / "phA_000_0000.nii.gz")
    assert np.array_equal(disk, sitk.GetArrayFromImage(a_img))

    # A different seed gives a different phantom.
    other = tmp_path / "other"
    make_phantom(other, sites=1, labeled=1, unlabeled=0, test=0, seed=1, partial_sites=0)
    _, diff = _read(other / "site_A" / "labelsTr" / "phA_000.nii.gz")
    _, same_seed = _read(tmp_path / "site_A" / "labelsTr" / "phA_000.nii.gz")
    assert not np.array_equal(diff, same_seed)


def test_rerun_removes_stale_cases(tmp_path: Path):
    make_phantom(tmp_path, sites=1, labeled=1, unlabeled=1, test=0, seed=3, partial_sites=0)
    assert (tmp_path / "site_A" / "imagesTr" / "phA_001_0000.nii.gz").exists()
    make_phantom(tmp_path, sites=1, labeled=1, unlabeled=0, test=0, seed=3, partial_sites=0)
    assert sorted(p.name for p in (tmp_path / "site_A" / "imagesTr").iterdir()) == ["phA_000_0000.nii.gz"]
    assert list(json.loads((tmp_path / "site_A" / "cases.json").read_text())) == ["phA_000"]


def test_size_limit_and_extra_sites():
    image, label = make_subject(np.random.default_rng(5), DEFAULT_SCANNERS[2], size_limit=48)
    assert max(image.GetSize()) <= 48 and image.GetSize() == label.GetSize()
    assert np.allclose(image.GetDirection(), DEFAULT_SCANNERS[2].direction)
    profiles = [scanner_for_site(i) for i in range(8)]
    assert profiles[:3] == DEFAULT_SCANNERS
    assert len({p.name for p in profiles}) == 8
    for p in profiles[3:]:
        assert isinstance(p, ScannerProfile)
        assert all(40 <= round(fov / sp) <= 96 for fov, sp in zip((360.0, 280.0, 220.0), p.spacing_mm))
    assert scanner_for_site(5) == scanner_for_site(5)


@pytest.mark.parametrize("kwargs", [dict(sites=0), dict(sites=27), dict(labeled=-1), dict(partial_sites=4)])
def test_invalid_arguments(tmp_path: Path, kwargs):
    with pytest.raises(ValueError):
        make_phantom(tmp_path, **kwargs)
