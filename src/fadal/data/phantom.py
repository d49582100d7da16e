"""A deterministic synthetic multi-site abdominal CT phantom: FADAL's embedded default dataset.

Each subject is an abdomen built from smooth shapes (superellipses, ellipsoids, tubes) in continuous
world coordinates (ITK's LPS convention: +x patient left, +y posterior, +z superior), with per-subject
variation of body and organ size, position and rotation and a smooth random non-rigid deformation.
It is then rasterised at a site's scanner spacing over a fixed physical field of view, stored with
the site's direction matrix, blurred slightly (partial volume), given low-frequency inhomogeneity and
the scanner's noise, and finally mapped through the scanner's affine HU change.

:func:`make_phantom` writes one nnU-Net-style folder per site (``site_A``, ``site_B``, ...)::

    site_A/
      dataset.json   cases.json
      imagesTr/<case>_0000.nii.gz   labelsTr/<case>.nii.gz     (labeled + unlabeled; labels only for labeled)
      imagesTs/<case>_0000.nii.gz   labelsTs/<case>.nii.gz     (held-out test scans, all organs)

Every subject draws from its own generator seeded by ``(seed, site index, case index)``, so a
subject never depends on how many scans the other sites or splits hold.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from fadal.data.io import write_image, write_json
from fadal.data.phantom_anatomy import sample_anatomy
from fadal.data.phantom_shapes import eval_modes
from fadal.data.phantom_tissues import ENHANCE, NATIVE_HU, SOFT_TISSUES, TISSUE_LABEL, Tissue, paint_tissues

__all__ = [
    "PHANTOM_LABELS",
    "PARTIAL_ANNOTATED",
    "FIELD_OF_VIEW_MM",
    "ScannerProfile",
    "DEFAULT_SCANNERS",
    "scanner_for_site",
    "site_letter",
    "make_subject",
    "make_phantom",
]

PHANTOM_LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "stomach": 5,
    "pancreas": 6,
    "aorta": 7,
}

#: Organs drawn on the labeled training scans of a partially annotated site (spleen, stomach and
#: pancreas were never drawn there; their voxels are written as background).
PARTIAL_ANNOTATED: tuple[str, ...] = ("liver", "kidney_right", "kidney_left", "aorta")

#: Physical field of view (x left-right, y anterior-posterior, z craniocaudal), in mm.
FIELD_OF_VIEW_MM: tuple[float, float, float] = (360.0, 280.0, 220.0)

_ORGANS: tuple[str, ...] = tuple(name for name in PHANTOM_LABELS if name != "background")
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_MIN_SIDE = 40  # voxels; spacing is capped so that no axis of the grid gets smaller than this
_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner and protocol differ from the others.

    ``hu = hu * hu_scale + hu_offset`` is applied to the finished scan (then clipped to the CT range,
    so air stays near -1000). ``contrast_boost_hu`` is the enhancement of the contrast phase: each
    tissue gains a tissue-specific fraction of it (aorta and renal cortex most, fat nothing).
    ``direction`` is the row-major 3x3 direction matrix of the stored volume (ITK convention).
    """

    name: str
    spacing_mm: tuple[float, float, float]
    noise_hu: float
    hu_scale: float = 1.0
    hu_offset: float = 0.0
    contrast_boost_hu: float = 0.0
    direction: tuple[float, ...] = _IDENTITY

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"scanner {self.name}: spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        if len(self.direction) != 9:
            raise ValueError(f"scanner {self.name}: direction must hold 9 numbers, got {len(self.direction)}")
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(d @ d.T, np.eye(3), atol=1e-6):
            raise ValueError(f"scanner {self.name}: direction {self.direction} is not orthonormal")
        if self.noise_hu < 0 or self.hu_scale <= 0:
            raise ValueError(f"scanner {self.name}: noise_hu must be >= 0 and hu_scale > 0")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["spacing_mm"] = [float(v) for v in self.spacing_mm]
        data["direction"] = [float(v) for v in self.direction]
        return data


DEFAULT_SCANNERS: list[ScannerProfile] = [
    ScannerProfile(
        name="A: 4 mm isotropic, low noise, light venous contrast",
        spacing_mm=(4.0, 4.0, 4.0), noise_hu=10.0, hu_scale=1.0, hu_offset=0.0, contrast_boost_hu=30.0,
    ),
    ScannerProfile(
        name="B: 5 mm thick slices, high noise, native, +20 HU calibration offset",
        spacing_mm=(4.5, 4.5, 5.0), noise_hu=25.0, hu_scale=1.0, hu_offset=20.0, contrast_boost_hu=0.0,
    ),
    ScannerProfile(
        name="C: 3.5 mm slices, arterial contrast, x/y-flipped storage",
        spacing_mm=(3.75, 3.75, 3.5), noise_hu=15.0, hu_scale=1.05, hu_offset=0.0, contrast_boost_hu=170.0,
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    ),
]


def site_letter(index: int) -> str:
    """``0 -> 'A'``, ``1 -> 'B'``, ... (at most 26 sites)."""
    if not 0 <= index < 26:
        raise ValueError(f"site index {index} out of range: the phantom supports 1 to 26 sites")
    return chr(ord("A") + index)


def scanner_for_site(index: int) -> ScannerProfile:
    """The profile of site ``index``: the defaults for the first three, perturbed copies after that.

    The perturbation depends only on ``index`` (not on the phantom seed), so a site's scanner is stable.
    """
    base = DEFAULT_SCANNERS[index % len(DEFAULT_SCANNERS)]
    if index < len(DEFAULT_SCANNERS):
        return base
    rng = np.random.default_rng([7919, index])
    fov = np.asarray(FIELD_OF_VIEW_MM)
    spacing = np.asarray(base.spacing_mm) * rng.uniform(0.9, 1.12, 3)
    spacing = np.clip(spacing, fov / 96.0, fov / _MIN_SIDE)
    return dataclasses.replace(
        base,
        name=f"{site_letter(index)}: variant of {base.name.split(':')[0]}",
        spacing_mm=tuple(round(float(s), 3) for s in spacing),
        noise_hu=round(float(base.noise_hu * rng.uniform(0.7, 1.4)), 2),
        hu_scale=round(float(base.hu_scale * rng.uniform(0.97, 1.03)), 4),
        hu_offset=round(float(base.hu_offset + rng.uniform(-10.0, 10.0)), 2),
        contrast_boost_hu=round(float(max(0.0, base.contrast_boost_hu * rng.uniform(0.8, 1.2) + rng.uniform(-10, 10))), 1),
    )


# --------------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------------
def _grid_geometry(scanner: ScannerProfile, size_limit: int, center: np.ndarray):
    fov = np.asarray(FIELD_OF_VIEW_MM)
    spacing = np.asarray(scanner.spacing_mm, dtype=float)
    size = np.rint(fov / spacing).astype(int)
    over = size > size_limit
    spacing = np.where(over, fov / size_limit, spacing)
    size = np.clip(size, 1, size_limit)
    direction = np.asarray(scanner.direction, dtype=float).reshape(3, 3)
    origin = center - direction @ ((size - 1) / 2.0 * spacing)
    return size, spacing, origin, direction


def make_subject(rng: np.random.Generator, scanner: ScannerProfile,
                 size_limit: int = 96) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic subject: ``(CT image in HU as int16, label map as uint8)`` on the same grid.

    The grid covers :data:`FIELD_OF_VIEW_MM` at ``scanner.spacing_mm`` (spacing is increased on an
    axis whose size would exceed ``size_limit``) with ``scanner.direction``; the field of view is
    shifted by up to +-15 mm craniocaudally (+-5 mm in-plane) around the body centre at world (0, 0, 0).
    """
    if size_limit < 8:
        raise ValueError(f"size_limit must be at least 8 voxels, got {size_limit}")
    a = sample_anatomy(rng)
    size, spacing, origin, direction = _grid_geometry(scanner, size_limit, a["fov_shift"])
    nx, ny, nz = (int(s) for s in size)
    shape = (nz, ny, nx)

    # World coordinates of every voxel centre (flat, array order z, y, x).
    kk, jj, ii = np.indices(shape, dtype=np.float32).reshape(3, -1)
    index_mm = np.stack([ii, jj, kk]) * spacing[:, None].astype(np.float32)
    world = (direction.astype(np.float32) @ index_mm) + origin[:, None].astype(np.float32)
    del kk, jj, ii, index_mm

    # Anatomy coordinates: undo the subject's rigid pose, then the smooth non-rigid deformation.
    rot = a["body_rot"].astype(np.float32)
    q = rot.T @ (world - a["body_shift"][:, None].astype(np.float32))
    q += eval_modes(q, a["deform"])

    tissue = paint_tissues(q, a)
    label = TISSUE_LABEL[tissue]

    # Appearance: tissue HU (+ contrast), visceral fat/bowel texture, inhomogeneity, blur, noise, scanner.
    boost = scanner.contrast_boost_hu * a["boost_factor"]
    table = NATIVE_HU + ENHANCE * np.float32(boost)
    table[SOFT_TISSUES] += a["hu_jitter"][SOFT_TISSUES].astype(np.float32)
    hu = table[tissue]
    soft = np.isin(tissue, SOFT_TISSUES)
    hu[soft] += eval_modes(q[:, soft], a["inhomogeneity"])[0]

    hu = hu.reshape(shape)
    tissue = tissue.reshape(shape)
    sigma_vox = 6.0 / spacing[::-1]
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    viscera = tissue == Tissue.VISCERA
    bowel = np.where(field > 0.35, np.float32(28.0 + 0.3 * boost), np.float32(-95.0)) + 6.0 * field
    hu[viscera] = bowel[viscera]
    del field, bowel

    hu = ndimage.gaussian_filter(hu, 0.6, mode="nearest")  # partial-volume blur at boundaries
    if scanner.noise_hu > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5, mode="wrap")
        noise *= np.float32(scanner.noise_hu / max(float(noise.std()), 1e-6))
        hu += noise
    hu = hu * np.float32(scanner.hu_scale) + np.float32(scanner.hu_offset)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    image = sitk.GetImageFromArray(hu)
    seg = sitk.GetImageFromArray(label.reshape(shape))
    for im in (image, seg):
        im.SetSpacing(tuple(float(s) for s in spacing))
        im.SetOrigin(tuple(float(o) for o in origin))
        im.SetDirection(tuple(float(d) for d in direction.ravel()))
    return image, seg


# --------------------------------------------------------------------------------------------------
# Whole phantom
# --------------------------------------------------------------------------------------------------
def make_phantom(out: Path, sites: int = 3, labeled: int = 3, unlabeled: int = 6, test: int = 3, seed: int = 0,
                 partial_sites: int = 1) -> list[Path]:
    """Write ``sites`` site folders ``out/site_A``, ``out/site_B``, ... and return their paths.

    Per site: ``labeled`` annotated training scans, then ``unlabeled`` training scans without labels,
    then ``test`` held-out scans with full reference labels. The last ``partial_sites`` sites are
    partially annotated: their labeled scans show only :data:`PARTIAL_ANNOTATED` (other organs are 0).
    Re-running into the same folder overwrites it (stale case files of the same site are removed);
    ``cases.json`` is written last, so its presence marks a complete site.
    """
    out = Path(out)
    for name, value in (("sites", sites), ("labeled", labeled), ("unlabeled", unlabeled), ("test", test),
                        ("partial_sites", partial_sites)):
        if int(value) != value or value < 0:
            raise ValueError(f"make_phantom: {name} must be a non-negative integer, got {value!r}")
    if not 1 <= sites <= 26:
        raise ValueError(f"make_phantom: sites must be between 1 and 26, got {sites}")
    if partial_sites > sites:
        raise ValueError(f"make_phantom: partial_sites ({partial_sites}) cannot exceed sites ({sites})")

    return [_write_site(out, s, labeled, unlabeled, test, seed, partial=s >= sites - partial_sites)
            for s in range(sites)]


def _write_site(out: Path, s: int, labeled: int, unlabeled: int, test: int, seed: int, partial: bool) -> Path:
    """Site ``s``: its scans (stale case files removed), then dataset.json, then cases.json (marks it complete)."""
    letter = site_letter(s)
    scanner = scanner_for_site(s)
    site_dir = out / f"site_{letter}"
    for sub in _SUBFOLDERS:
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    cases: dict[str, dict] = {}
    written: set[Path] = set()
    for c in range(labeled + unlabeled + test):
        case_id = f"ph{letter}_{c:03d}"
        split = "labeled" if c < labeled else "unlabeled" if c < labeled + unlabeled else "test"
        image, seg = make_subject(np.random.default_rng([int(seed), s, c]), scanner)
        annotated = _write_case(site_dir, case_id, split, image, seg, partial, written)
        cases[case_id] = {"site": letter, "split": split, "annotated": annotated}
    pattern = re.compile(rf"^ph{letter}_\d+(_0000)?\.nii\.gz$")
    for sub in _SUBFOLDERS:
        for f in (site_dir / sub).iterdir():
            if f.is_file() and pattern.match(f.name) and f not in written:
                f.unlink()
    write_json({
        "name": f"FADAL phantom site {letter}",
        "channel_names": {"0": "CT"},
        "labels": dict(PHANTOM_LABELS),
        "numTraining": labeled + unlabeled,
        "file_ending": ".nii.gz",
        "scanner": scanner.to_dict(),
        "description": (
            f"Synthetic abdominal CT phantom, site {letter} ({scanner.name}). "
            f"{labeled} labeled + {unlabeled} unlabeled training scans, {test} test scans; "
            + ("labeled scans annotate only " + ", ".join(PARTIAL_ANNOTATED) + ". " if partial else "")
            + f"Generated by fadal.data.phantom with seed {seed}."
        ),
    }, site_dir / "dataset.json")
    write_json(cases, site_dir / "cases.json")
    return site_dir


def _write_case(site_dir: Path, case_id: str, split: str, image: sitk.Image, seg: sitk.Image, partial: bool,
                written: set[Path]) -> list[str]:
    """Write one scan (and its label map unless unlabeled) into its split's folders; returns the organs drawn.

    A partially annotated site's labeled scans keep only :data:`PARTIAL_ANNOTATED` (the others are 0)."""
    if split == "test":
        written.add(write_image(image, site_dir / "imagesTs" / f"{case_id}_0000.nii.gz"))
        written.add(write_image(seg, site_dir / "labelsTs" / f"{case_id}.nii.gz"))
        return list(_ORGANS)
    written.add(write_image(image, site_dir / "imagesTr" / f"{case_id}_0000.nii.gz"))
    if split != "labeled":
        return []
    annotated = list(_ORGANS)
    if partial:
        arr = sitk.GetArrayFromImage(seg)
        arr[np.isin(arr, [PHANTOM_LABELS[o] for o in _ORGANS if o not in PARTIAL_ANNOTATED])] = 0
        drawn = sitk.GetImageFromArray(arr)
        drawn.CopyInformation(seg)
        seg = drawn
        annotated = list(PARTIAL_ANNOTATED)
    written.add(write_image(seg, site_dir / "labelsTr" / f"{case_id}.nii.gz"))
    return annotated
