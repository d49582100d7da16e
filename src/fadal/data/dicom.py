"""DICOM CT series in: one series per folder, with the checks a hospital export needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fadal.errors import FadalInputError


def list_series(folder: Path) -> dict[str, list[str]]:
    """Series instance UID -> sorted file names (SimpleITK/GDCM sorts by position along the normal)."""
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder)) or []
    return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a CT series; refuse folders with several series (naming them) or with uneven slice gaps."""
    folder = Path(folder)
    series = list_series(folder)
    if not series:
        raise FadalInputError(f"{folder}: no DICOM series found (is it a folder of .dcm files?)")
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(f"{uid} ({len(f)} files)" for uid, f in series.items())
            raise FadalInputError(f"{folder}: {len(series)} DICOM series found; choose one with --series: {listing}")
        series_uid = next(iter(series))
    if series_uid not in series:
        raise FadalInputError(f"{folder}: series {series_uid} not found; present: {list(series)}")
    files = series[series_uid]
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    modality = getattr(first, "Modality", "")
    if modality and modality != "CT":
        raise FadalInputError(f"{folder}: modality is {modality}, FADAL segments CT")
    positions = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        positions.append([float(v) for v in ds.ImagePositionPatient])
    if len(files) > 2:
        pos = np.asarray(positions)
        gaps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
        if gaps.max() - gaps.min() > 0.01 * max(gaps.mean(), 1e-6) + 1e-3:
            raise FadalInputError(
                f"{folder}: uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm): missing slices? "
                "re-export the complete series"
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise FadalInputError(f"{folder}: unreadable DICOM series ({str(err).strip().splitlines()[-1]})") from err
