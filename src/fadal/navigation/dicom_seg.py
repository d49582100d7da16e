"""DICOM Segmentation (SEG) export of a label map, referencing the CT series it was computed on.

The SEG is a BINARY segmentation with one segment per organ present, built with highdicom. It shares the
CT's Frame of Reference and references every CT instance, so PACS viewers and 3D Slicer (QuantitativeReporting
/ DCMQI) overlay it on the CT. The label map must lie on the DICOM series' voxel grid (as FADAL's inference
output for a DICOM input does): each label slice is matched to its CT instance by ImagePositionPatient, so the
frames are correct whatever order the files, the series reader or the label's slice axis use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fadal.data.io import DIRECTION_TOL, SPACING_TOL_MM, atomic_path
from fadal.errors import FadalInputError

log = logging.getLogger(__name__)

#: SNOMED CT codes for the segmented property type (from pydicom's DICOM code dictionary).
_SCT_TYPES = {
    "liver": "Liver",
    "spleen": "Spleen",
    "kidney": "Kidney",
    "stomach": "Stomach",
    "pancreas": "Pancreas",
    "aorta": "Aorta",
    "gallbladder": "Gallbladder",
    "inferior_vena_cava": "InferiorVenaCava",
    "portal_vein": "PortalVein",
    "splenic_vein": "SplenicVein",
    "adrenal_gland": "AdrenalGland",
    "esophagus": "Esophagus",
    "duodenum": "Duodenum",
    "colon": "Colon",
    "small_bowel": "SmallIntestine",
}
_LATERALITY = {"_right": "Right", "_left": "Left"}


def _source_series(folder: Path, series_uid: str | None) -> dict[str, list[str]]:
    from fadal.data.dicom import list_series

    series = list_series(folder)
    if not series:
        raise FadalInputError(f"{folder}: no DICOM series found (is it a folder of .dcm files?)")
    if series_uid is not None:
        if series_uid not in series:
            raise FadalInputError(f"{folder}: series {series_uid} not found; present: {list(series)}")
        return {series_uid: series[series_uid]}
    return series


def _match_slices(label: sitk.Image, datasets: list) -> list[int] | str:
    """For each dataset (in the given order), the label slice index k it holds; or why the grids differ."""
    nx, ny, nz = label.GetSize()
    sx, sy, _ = label.GetSpacing()
    direction = np.asarray(label.GetDirection(), dtype=float).reshape(3, 3)
    if len(datasets) != nz:
        return f"{len(datasets)} DICOM slices vs {nz} label slices"
    first = datasets[0]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        return "multi-frame (enhanced) CT is not supported; export the series as single-frame images"
    for ds in datasets:
        if int(ds.Rows) != ny or int(ds.Columns) != nx:
            return f"DICOM image size {ds.Columns}x{ds.Rows} vs label {nx}x{ny}"
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not (np.allclose(iop[:3], direction[:, 0], atol=10 * DIRECTION_TOL)
                and np.allclose(iop[3:], direction[:, 1], atol=10 * DIRECTION_TOL)):
            return (f"orientation: DICOM ImageOrientationPatient {np.round(iop, 4).tolist()} vs label row/column "
                    f"directions {np.round(direction[:, 0], 4).tolist()} / {np.round(direction[:, 1], 4).tolist()}")
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        if abs(col_spacing - sx) > SPACING_TOL_MM or abs(row_spacing - sy) > SPACING_TOL_MM:
            return f"pixel spacing {col_spacing:.4g} x {row_spacing:.4g} mm vs label {sx:.4g} x {sy:.4g} mm"
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    slice_origins = np.asarray([label.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(nz)])
    tol = max(0.01, 0.1 * min(label.GetSpacing()))
    dist = np.linalg.norm(positions[:, None, :] - slice_origins[None, :, :], axis=-1)  # (datasets, slices)
    k_of = dist.argmin(axis=1)
    worst = float(dist[np.arange(len(datasets)), k_of].max())
    if worst > tol or len(set(k_of.tolist())) != nz:
        return (f"slice positions: a DICOM slice lies {worst:.3g} mm from the nearest label slice "
                f"(tolerance {tol:.3g} mm)")
    return [int(k) for k in k_of]


def _complete_uids(datasets: list, folder: Path) -> None:
    """Anonymised exports sometimes blank the UIDs a SEG must reference. Take SOP Class/Instance UIDs from the
    file meta header when blank; generate stable Study/Series Instance UIDs when blank (logged: the SEG then
    links to the CT through the Frame of Reference and geometry only). A missing Frame of Reference is an error.
    """
    from pydicom.uid import generate_uid

    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
            raise FadalInputError(f"{folder}: a DICOM file has no SOP Class/Instance UID; cannot reference it")
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets}
    if "" in frames or len(frames) != 1:
        raise FadalInputError(f"{folder}: the series needs one FrameOfReferenceUID (found {sorted(frames)}); "
                              "a DICOM SEG cannot be placed on the CT without it")
    seed = [frames.pop(), *sorted(str(ds.SOPInstanceUID) for ds in datasets)]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        found = {str(ds.get(keyword, "") or "") for ds in datasets}
        if found == {""}:
            uid = generate_uid(entropy_srcs=[keyword, *seed])
            log.warning("%s: the CT series has no %s (anonymised?); using the generated %s. The SEG will be "
                        "placed on the CT through its FrameOfReferenceUID, not linked by this UID.",
                        folder, keyword, uid)
            for ds in datasets:
                setattr(ds, keyword, uid)
        elif "" in found or len(found) > 1:
            raise FadalInputError(f"{folder}: inconsistent {keyword} across the series: {sorted(found)}")


def _property_type(name: str):
    from pydicom.sr.codedict import codes

    key = name.lower()
    modifier = None
    for suffix, side in _LATERALITY.items():
        if key.endswith(suffix):
            key, modifier = key[: -len(suffix)], getattr(codes.SCT, side)
            break
    if key in _SCT_TYPES:
        return getattr(codes.SCT, _SCT_TYPES[key]), modifier
    prefixes = [k for k in _SCT_TYPES if key.startswith(k)]
    if prefixes:  # e.g. portal_vein_and_splenic_vein -> portal vein
        return getattr(codes.SCT, _SCT_TYPES[max(prefixes, key=len)]), modifier
    return codes.SCT.Organ, modifier


def _segment_descriptions(present: list[tuple[str, int]]):
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    import fadal
    from fadal.navigation.render import organ_color

    algorithm = hd.AlgorithmIdentificationSequence(
        name="FADAL", family=codes.cid7162.ArtificialIntelligence, version=str(fadal.__version__),
    )
    descriptions = []
    for number, (name, _) in enumerate(present, start=1):
        prop_type, modifier = _property_type(name)
        rgb = np.round(np.asarray(organ_color(name)) * 255).astype(int)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=name[:64],
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*rgb.tolist()),
        )
        if modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)
            ]
        descriptions.append(desc)
    return descriptions


def write_dicom_seg(label: sitk.Image, source_dicom_folder: Path, labels: Mapping[str, int], out_path: Path,
                    series_description: str = "FADAL organ segmentation", *, series_uid: str | None = None) -> Path:
    """Write ``label`` as a DICOM SEG (BINARY, one segment per organ of ``labels`` present) referencing the CT
    series in ``source_dicom_folder``; atomic write. Returns ``out_path``.

    ``label`` must be on the series' grid (same rows/columns, pixel spacing, orientation and one slice per
    instance at its ImagePositionPatient); otherwise :class:`FadalInputError` says so: resample it first with
    ``fadal.data.io.resample_like(label, read_dicom_series(folder), is_label=True)``. With several series in
    the folder, the one whose grid matches the label is used (or ``series_uid``). Label values not named in
    ``labels`` are left out (logged).
    """
    import highdicom as hd

    import fadal

    folder = Path(source_dicom_folder)
    out_path = Path(out_path)
    if label.GetDimension() != 3:
        raise FadalInputError(f"label map must be 3D, got {label.GetDimension()}D")
    datasets, k_of = _matching_series(label, folder, series_uid)
    _complete_uids(datasets, folder)
    modality = getattr(datasets[0], "Modality", "")
    if modality and modality != "CT":
        log.info("%s: source modality is %s, not CT", folder, modality)
    present, pixel_array = _segment_frames(label, labels, k_of)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(present),
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="FADAL",
        manufacturer_model_name="FADAL",
        software_versions=str(fadal.__version__),
        device_serial_number="none",
        series_description=series_description[:64],
        content_label="FADAL",
        content_description="Automatic organ segmentation"[:64],
    )
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return out_path


def _matching_series(label: sitk.Image, folder: Path, series_uid: str | None) -> tuple[list, list[int]]:
    """The first series of ``folder`` (or ``series_uid``) on the label's grid: its datasets (no pixels) and,
    for each, the label slice it holds; an error listing why each series does not match otherwise."""
    import pydicom

    reasons = []
    for uid, files in _source_series(folder, series_uid).items():
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        match = _match_slices(label, datasets)
        if isinstance(match, str):
            reasons.append(f"series {uid}: {match}")
            continue
        return datasets, match
    raise FadalInputError(
        f"{folder}: the label map is not on the DICOM series' grid ({'; '.join(reasons)}); resample it onto "
        "the series first: fadal.data.io.resample_like(label, read_dicom_series(folder), is_label=True)"
    )


def _segment_frames(label: sitk.Image, labels: Mapping[str, int],
                    k_of: list[int]) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The named organs present (by label value) and the frames as segment numbers 1..n, in the order of the
    source instances (matched by position)."""
    arr = sitk.GetArrayViewFromImage(label)  # (z, y, x): frame k is (rows = y, columns = x), as in DICOM
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.mod(arr, 1) == 0):
            raise FadalInputError("label map has non-integer values; was it resampled linearly?")
        arr = arr.astype(np.int32)
    if arr.min() < 0:
        raise FadalInputError(f"label map has negative values (min {arr.min()}); labels are 0..255")
    values_present = {int(v) for v in np.unique(arr)} - {0}
    present = sorted(((name, int(v)) for name, v in labels.items() if int(v) != 0 and int(v) in values_present),
                     key=lambda item: item[1])
    undeclared = sorted(values_present - {int(v) for v in labels.values()})
    if undeclared:
        log.info("label values %s are not named in labels; left out of the DICOM SEG", undeclared)
    if not present:
        raise FadalInputError("none of the named organs is present in the label map; nothing to write")
    lut = np.zeros(int(max(int(arr.max()), max(v for _, v in present))) + 1, dtype=np.uint8 if len(present) < 256
                   else np.uint16)
    for number, (_, value) in enumerate(present, start=1):
        lut[value] = number
    return present, lut[np.asarray(arr)[k_of]]


def _series_number(source) -> int:
    """The SEG's series number: the CT's + 1000, so viewers list it next to its CT."""
    try:
        return int(getattr(source, "SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000
