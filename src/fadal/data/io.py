"""Reading and writing volumes with their geometry, and the checks that catch bad input early.

Every volume in FADAL travels as a :class:`SimpleITK.Image`, because it carries spacing, origin and
direction with the voxels: outputs must line up with their inputs in world coordinates. Writes are
atomic (temporary file, then rename) so an interrupted run never leaves half a NIfTI behind.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, TypeAdapter, ValidationError

from fadal.errors import FadalInputError

#: File mode of a site's local state and caches (optimiser and normalisation state, the epsilon
#: ledger, preprocessed volumes, registration caches): readable by the site's own account only.
PRIVATE = 0o600
#: File mode of ordinary outputs (reports, checkpoints, label maps).
PUBLIC = 0o644

#: Tolerances for "same grid": spacing/origin in mm, direction cosines unitless.
SPACING_TOL_MM = 1e-3
ORIGIN_TOL_MM = 1e-2
DIRECTION_TOL = 1e-4


def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder (``series_uid`` picks one of several)."""
    path = Path(path)
    if not path.exists():
        raise FadalInputError(f"{path}: file not found")
    if path.is_dir():
        from fadal.data.dicom import read_dicom_series

        return read_dicom_series(path, series_uid)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise FadalInputError(f"{path}: unreadable image ({first}); is it a complete NIfTI/NRRD file?") from err
    if path.name.endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)
        if np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.floating):
            _check_nifti_nan(path)
    return image


def check_readable(path: str | Path) -> None:
    """What :func:`read_image` checks of a file short of reading its voxels: the header and, for NIfTI,
    that the file is complete. Lets a command check all its inputs before it writes anything."""
    path = Path(path)
    if not path.exists():
        raise FadalInputError(f"{path}: file not found")
    if path.is_dir():
        return  # a DICOM series: checked when read
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise FadalInputError(f"{path}: unreadable image ({first}); is it a complete NIfTI/NRRD file?") from err
    if path.name.endswith((".nii", ".nii.gz")):
        check_nifti_complete(path)


def check_nifti_complete(path: str | Path) -> None:
    """A NIfTI file must hold all the voxels its header declares, and a ``.nii.gz`` a complete gzip stream.

    ITK reads a truncated file (a half-copied scan) without complaint, as a volume whose missing part
    is zeros: measured here, a ``.nii.gz`` cut at 60 % of its bytes reads as 40 % zeros. A truncated
    gzip stream raises ``EOFError`` only when decompressed to its end, so it is, once more."""
    import nibabel as nib

    path = Path(path)
    try:
        voxels = nib.load(str(path)).dataobj  # an ArrayProxy: header only, no voxel read yet
        needed = int(voxels.offset) + int(np.prod(voxels.shape)) * np.dtype(voxels.dtype).itemsize
        if path.name.endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (EOFError, OSError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise FadalInputError(f"{path}: truncated or corrupt file ({err}); copy it again") from err
    if size < needed:
        raise FadalInputError(f"{path}: truncated file ({size} of {needed} bytes); copy it again")


def _check_nifti_nan(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0; read float NIfTI data once more to catch them."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n:
        raise FadalInputError(f"{path}: {n} NaN/inf voxels; fix or mask them before use")


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, mode: int = PUBLIC) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; it replaces ``path`` only if the block
    succeeds. Every output of FADAL goes through here: a crash mid-write leaves the previous file (or
    none), never half a file, and a resumed run trusts whatever file it finds.

    ``suffix`` (default: ``path``'s own) matters to writers that pick the format from the name;
    ``mode`` is the file's mode (:data:`PRIVATE` for a site's state and caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix or "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = PUBLIC) -> Path:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_torch(obj: Any, path: str | Path, mode: int = PUBLIC) -> Path:
    """``torch.save`` through :func:`atomic_path` (checkpoints, optimiser and normalisation state).

    Store tensors, numbers, strings, lists and dicts only: every reader loads with ``weights_only=True``."""
    import torch

    with atomic_path(path, suffix=".pt", mode=mode) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True, mode: int = PUBLIC) -> Path:
    """Write atomically (:func:`atomic_path`); the format follows the name (default NIfTI)."""
    with atomic_path(path, suffix="".join(Path(path).suffixes) or ".nii.gz", mode=mode) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(path)


def write_json(data: Any, path: str | Path, mode: int = PUBLIC) -> Path:
    with atomic_path(path, suffix=".json", mode=mode) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    return Path(path)


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: a site's cache or state folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def make_private(folder: str | Path) -> None:
    """Files under ``folder`` that a library wrote with the umask's mode (e.g. MONAI's
    ``PersistentDataset``) become :data:`PRIVATE`, folders 0700."""
    folder = Path(folder)
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        os.chmod(p, 0o700 if p.is_dir() else PRIVATE)


Record = TypeVar("Record")


def write_record(record: BaseModel, path: str | Path, exclude_none: bool = False) -> Path:
    """Write a typed record (:mod:`fadal.records`) as JSON, atomically; :func:`read_record` reads it back.

    ``exclude_none`` leaves out fields that are None (for records whose None means "not recorded yet"
    and is the default, such as a federation's round entries)."""
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(record.model_dump_json(indent=1, exclude_none=exclude_none))
    return Path(path)


def read_record(kind: type[Record], path: str | Path, name: str | None = None) -> Record:
    """A record file, validated against the record the writer used (a pydantic model or a union of them).

    A missing, half-written or foreign file is one :class:`FadalInputError` naming it (``name``: what
    to call the record in it, default the model's class name)."""
    path = Path(path)
    try:
        return TypeAdapter(kind).validate_json(path.read_bytes())
    except FileNotFoundError as err:
        raise FadalInputError(f"{path}: not found") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "top level"
        raise FadalInputError(f"{path}: not a valid {name or getattr(kind, '__name__', 'record')} file "
                              f"({where}: {first['msg']}); it was not written by this FADAL version, or "
                              "only partly: delete it and run the stage that writes it again") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def same_geometry(a: sitk.Image, b: sitk.Image) -> str | None:
    """Return ``None`` if both images share a voxel grid, else a short description of the difference."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=SPACING_TOL_MM):
        return f"spacing {_fmt(a.GetSpacing())} vs {_fmt(b.GetSpacing())} mm"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=ORIGIN_TOL_MM):
        return f"origin {_fmt(a.GetOrigin())} vs {_fmt(b.GetOrigin())} mm"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=DIRECTION_TOL):
        return f"direction {_fmt(a.GetDirection())} vs {_fmt(b.GetDirection())}"
    return None


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_image_values(image: sitk.Image, path: str | Path) -> None:
    """Reject empty, constant or NaN/inf volumes: they make training silently produce garbage."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0:
        raise FadalInputError(f"{path}: empty volume (size {image.GetSize()})")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        n = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise FadalInputError(f"{path}: {n} NaN/inf voxels; fix or mask them before use")
    if float(arr.max()) == float(arr.min()):
        raise FadalInputError(f"{path}: constant volume (every voxel = {float(arr.min()):g}); not a CT scan")


def check_label(label: sitk.Image, image: sitk.Image, allowed: set[int], label_path: str | Path,
                image_path: str | Path) -> None:
    """A label map must sit on its image's grid and hold only the values ``dataset.json`` declares."""
    diff = same_geometry(image, label)
    if diff is not None:
        raise FadalInputError(
            f"{label_path}: geometry differs from its image {Path(image_path).name}: {diff}; "
            "resample the label onto the image grid (nearest neighbour)"
        )
    arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise FadalInputError(f"{label_path}: label map contains NaN/inf")
        if not np.all(np.mod(arr, 1) == 0):
            raise FadalInputError(f"{label_path}: label map has non-integer values; was it resampled linearly?")
    values = set(int(v) for v in np.unique(arr))
    unknown = sorted(values - set(allowed))
    if unknown:
        raise FadalInputError(
            f"{label_path}: unknown label values {unknown}; dataset.json declares {sorted(allowed)}"
        )


def resample_like(image: sitk.Image, reference: sitk.Image, is_label: bool, default: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through world coordinates."""
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, default, image.GetPixelID())
