"""Organ surface meshes for surgical navigation, in the CT's world coordinates (LPS, mm).

A label map becomes one closed triangle mesh per organ: marching cubes on the organ's binary mask in voxel
index space, mapped to world coordinates with the image's full geometry (origin, spacing *and* direction),
lightly smoothed with a non-shrinking Taubin filter so the surface stays within one voxel of the label
boundary, optionally decimated, normals outward. Mesh vertices are therefore in the same coordinates as the
DICOM patient coordinates (ImagePositionPatient) of the CT: the meshes overlay the CT in 3D Slicer or any
navigation system that registers the CT.

Files (STL, OBJ, VTP) are written atomically and carry the coordinate system tag that 3D Slicer reads
(``SPACE=LPS`` in the STL/OBJ header, a ``SPACE`` field-data string in VTP); ``meshes.json`` beside them records
the convention and each organ's size and volume.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import trimesh
from scipy import ndimage

from fadal.data.io import atomic_write_bytes, write_json
from fadal.errors import FadalInputError

log = logging.getLogger(__name__)

#: 26-connectivity: voxels touching by a corner belong to the same component (thin vessels stay whole).
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
#: Taubin pass band: ``nu`` slightly larger than ``lamb`` is what makes the filter non-shrinking.
_TAUBIN_LAMBDA = 0.5
_TAUBIN_NU = 0.53
MESH_FORMATS = ("stl", "obj", "vtp")
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

_SLICER_NOTE = (
    "Vertices are ITK/DICOM patient coordinates in mm (LPS: +x towards the patient's left, +y posterior, "
    "+z superior), the same frame as the CT's ImagePositionPatient, so the meshes overlay the CT without any "
    "transform. 3D Slicer displays in RAS internally but reads mesh files as LPS by default since Slicer 4.11 "
    "(2020), and these files also state it (SPACE=LPS in the STL/OBJ header, a SPACE field-data array in VTP). "
    "Older Slicer versions, or software that assumes RAS: choose 'LPS' in Add Data > Options, or rewrite the "
    "files with write_meshes(..., coordinate_system='RAS')."
)


# --------------------------------------------------------------------------------------------- geometry

def index_to_world_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 matrix M, origin o) with world_LPS = M @ (i, j, k) + o for continuous voxel index (x, y, z)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=float)


def index_to_world(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (N, 3) in (x, y, z) order -> world LPS points (N, 3) in mm."""
    matrix, origin = index_to_world_matrix(image)
    return np.asarray(index_xyz, dtype=float) @ matrix.T + origin


def _check_label(label: sitk.Image) -> np.ndarray:
    if label.GetDimension() != 3:
        raise FadalInputError(f"label map must be 3D, got {label.GetDimension()}D")
    arr = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.mod(arr, 1) == 0):
            raise FadalInputError("label map has non-integer values; was it resampled linearly?")
        return np.asarray(arr).astype(np.int32)
    return np.asarray(arr)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


# ---------------------------------------------------------------------------------------- post-process

def postprocess_label(label: sitk.Image, largest_component: bool = True, fill_holes: bool = True) -> sitk.Image:
    """Per organ: keep the largest connected component (26-connectivity), fill enclosed holes.

    Holes are filled only with background voxels: an organ never takes voxels from another organ (a vessel
    running through the liver stays a vessel). Geometry and pixel type are unchanged.
    """
    arr = _check_label(label)
    out = np.zeros_like(arr)
    boxes = ndimage.find_objects(arr)
    values = [int(v) for v in np.unique(arr) if v != 0]
    for value in values:
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        mask = arr[box] == value
        if largest_component:
            mask = _largest_component(mask)
        out[box][mask] = value
    if fill_holes:
        for value in values:
            box = boxes[value - 1] if value - 1 < len(boxes) else None
            if box is None:
                continue
            # A one-voxel margin so a hole is judged against the whole organ, not against the box edge.
            grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, arr.shape))
            sub = out[grown]
            filled = ndimage.binary_fill_holes(sub == value)
            sub[filled & (sub == 0)] = value
    result = sitk.GetImageFromArray(out.astype(sitk.GetArrayViewFromImage(label).dtype, copy=False))
    result.CopyInformation(label)
    return result


# ---------------------------------------------------------------------------------------------- meshes

def _simplify(mesh: trimesh.Trimesh, target_faces: int, name: str) -> trimesh.Trimesh:
    try:
        simplified = mesh.simplify_quadric_decimation(face_count=int(target_faces))
    except (ImportError, ModuleNotFoundError) as err:
        if not _simplify.warned:  # type: ignore[attr-defined]
            log.info("mesh decimation skipped (%s); install 'fast-simplification' to decimate meshes", err)
            _simplify.warned = True  # type: ignore[attr-defined]
        return mesh
    if not simplified.is_watertight:
        log.info("%s: decimated mesh is not watertight; keeping the full-resolution mesh", name)
        return mesh
    return simplified


_simplify.warned = False  # type: ignore[attr-defined]


def mesh_from_mask(mask_zyx: np.ndarray, reference: sitk.Image, offset_zyx: Iterable[int] = (0, 0, 0),
                   smoothing_iterations: int = 10) -> trimesh.Trimesh:
    """Closed surface of a binary mask (array order z, y, x) lying at ``offset_zyx`` in ``reference``'s grid.

    Marching cubes runs at level 0.5 on the mask padded with one background voxel (so the surface is closed),
    in voxel index space; vertices are converted from array order (z, y, x) to index order (x, y, z) and then
    mapped to world LPS coordinates with ``reference``'s direction, spacing and origin.
    """
    from skimage.measure import marching_cubes

    padded = np.pad(np.asarray(mask_zyx, dtype=np.float32), 1)
    verts_zyx, faces, _, _ = marching_cubes(padded, level=0.5)
    index_xyz = (verts_zyx - 1.0 + np.asarray(tuple(offset_zyx), dtype=float))[:, ::-1]
    mesh = trimesh.Trimesh(index_to_world(reference, index_xyz), faces, process=True)
    if smoothing_iterations > 0:
        trimesh.smoothing.filter_taubin(mesh, lamb=_TAUBIN_LAMBDA, nu=_TAUBIN_NU, iterations=int(smoothing_iterations))
    _orient_outward(mesh)
    return mesh


def _orient_outward(mesh: trimesh.Trimesh) -> None:
    """Consistent winding with normals pointing out of the organ (the axis swap and a flipped direction
    matrix both reverse marching cubes' winding; fix_normals repairs either)."""
    mesh.fix_normals()
    if mesh.is_watertight and mesh.volume < 0:
        mesh.invert()


def organ_meshes(label: sitk.Image, labels: Mapping[str, int], smoothing_iterations: int = 10,
                 target_faces: int | None = 20000, keep_largest: bool = True) -> dict[str, trimesh.Trimesh]:
    """One world-coordinate (LPS, mm) surface mesh per organ present in ``label``.

    ``labels`` maps organ name -> label value (``dataset.json``); background (value 0) and organs absent
    from the label map are skipped. ``keep_largest`` meshes only the largest connected component (stray
    islands of a network prediction are dropped). ``target_faces`` decimates larger meshes when trimesh's
    quadric decimation is available (package ``fast-simplification``); otherwise the mesh is kept as is.
    Each mesh's ``metadata`` holds its label value and volumes (``mesh_volume_ml``, ``label_volume_ml``:
    all voxels of the value, ``meshed_voxel_volume_ml``: the voxels the mesh encloses).
    """
    arr = _check_label(label)
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
    boxes = ndimage.find_objects(arr)
    meshes: dict[str, trimesh.Trimesh] = {}
    for name, value in labels.items():
        value = int(value)
        if value <= 0:
            continue
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            log.debug("%s (label %d) absent from the label map", name, value)
            continue
        mask = arr[box] == value
        n_label = int(mask.sum())
        if keep_largest:
            mask = _largest_component(mask)
            kept = int(mask.sum())
            if kept < 0.9 * n_label:
                log.warning("%s: the largest connected component holds %.0f%% of the label's voxels; the mesh "
                            "leaves out the rest (use keep_largest=False to mesh every part)", name,
                            100.0 * kept / n_label)
        mesh = mesh_from_mask(mask, label, [s.start for s in box], smoothing_iterations)
        if target_faces is not None and len(mesh.faces) > target_faces:
            mesh = _simplify(mesh, target_faces, name)
            _orient_outward(mesh)
        mesh.metadata.update({
            "name": name,
            "label": value,
            "coordinate_system": "LPS",
            "units": "mm",
            "label_volume_ml": n_label * voxel_ml,
            "meshed_voxel_volume_ml": int(mask.sum()) * voxel_ml,
            "mesh_volume_ml": float(mesh.volume) / 1000.0 if mesh.is_watertight else None,
        })
        meshes[name] = mesh
    return meshes


# ----------------------------------------------------------------------------------------------- files

def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe or "organ"


def _stl_bytes(mesh: trimesh.Trimesh, name: str, space: str) -> bytes:
    data = bytearray(trimesh.exchange.stl.export_stl(mesh))
    # Binary STL: 80-byte free header (must not start with "solid"); Slicer looks for "SPACE=LPS|RAS" in it.
    header = f"FADAL {name} SPACE={space} mm".encode("ascii", "replace")[:80].ljust(80, b" ")
    data[:80] = header
    return bytes(data)


def _format_rows(a: np.ndarray, fmt: str, prefix: str = "") -> str:
    """Rows of ``a`` as text, one ``%``-format over the whole array (C speed: ~50x trimesh's OBJ writer)."""
    a = np.asarray(a)
    if not len(a):
        return ""
    line = prefix + " ".join([fmt] * a.shape[1]) + "\n"
    return (line * len(a)) % tuple(a.ravel().tolist())


def _obj_bytes(mesh: trimesh.Trimesh, name: str, space: str) -> bytes:
    """Wavefront OBJ with vertex normals (``f v//vn``, 1-based), the convention in the first comment line."""
    faces = np.asarray(mesh.faces, dtype=np.int64) + 1
    text = "".join([
        f"# FADAL organ mesh '{name}'. SPACE={space}, units mm\n",
        _format_rows(np.asarray(mesh.vertices, dtype=float), "%.6f", "v "),
        _format_rows(np.asarray(mesh.vertex_normals, dtype=float), "%.5f", "vn "),
        ("f %d//%d %d//%d %d//%d\n" * len(faces)) % tuple(np.repeat(faces, 2, axis=1).ravel().tolist()),
    ])
    return text.encode("utf-8")


def _vtp_bytes(mesh: trimesh.Trimesh, name: str, space: str) -> bytes:
    """VTK XML PolyData, ASCII: points, triangles, vertex normals and a ``SPACE`` string in field data
    (the tag 3D Slicer reads). String arrays in ASCII VTK XML are byte values, each string 0-terminated."""
    v = np.asarray(mesh.vertices, dtype=float)
    f = np.asarray(mesh.faces, dtype=np.int64)
    n = np.asarray(mesh.vertex_normals, dtype=float)

    def rows(a: np.ndarray, fmt: str) -> str:
        return _format_rows(a, fmt).rstrip("\n")

    def string_array(array_name: str, value: str) -> str:
        codes = " ".join(str(b) for b in value.encode("ascii")) + " 0"
        return (f'        <Array type="String" Name="{array_name}" NumberOfTuples="1" format="ascii">\n'
                f"          {codes}\n        </Array>\n")

    offsets = np.arange(3, 3 * len(f) + 1, 3, dtype=np.int64)
    parts = [
        '<?xml version="1.0"?>\n',
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n',
        "  <PolyData>\n",
        "    <FieldData>\n",
        string_array("SPACE", space),
        string_array("Name", name),
        "    </FieldData>\n",
        f'    <Piece NumberOfPoints="{len(v)}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
        f'NumberOfPolys="{len(f)}">\n',
        '      <PointData Normals="Normals">\n',
        '        <DataArray type="Float32" Name="Normals" NumberOfComponents="3" format="ascii">\n',
        rows(n, "%.5f"), "\n        </DataArray>\n",
        "      </PointData>\n",
        "      <Points>\n",
        '        <DataArray type="Float64" Name="Points" NumberOfComponents="3" format="ascii">\n',
        rows(v, "%.5f"), "\n        </DataArray>\n",
        "      </Points>\n",
        "      <Polys>\n",
        '        <DataArray type="Int64" Name="connectivity" format="ascii">\n',
        rows(f, "%d"), "\n        </DataArray>\n",
        '        <DataArray type="Int64" Name="offsets" format="ascii">\n',
        _format_rows(offsets[None], "%d").rstrip("\n"), "\n        </DataArray>\n",
        "      </Polys>\n",
        "    </Piece>\n",
        "  </PolyData>\n",
        "</VTKFile>\n",
    ]
    return "".join(parts).encode("ascii")


_WRITERS = {"stl": _stl_bytes, "obj": _obj_bytes, "vtp": _vtp_bytes}


def write_meshes(meshes: Mapping[str, trimesh.Trimesh], out_dir: Path, formats: Iterable[str] = MESH_FORMATS,
                 coordinate_system: str = "LPS") -> dict[str, list[Path]]:
    """Write each organ mesh as ``out_dir/<organ>.<fmt>`` and document them in ``out_dir/meshes.json``.

    ``coordinate_system``: ``"LPS"`` (default; ITK/DICOM patient coordinates, what the meshes are in) or
    ``"RAS"`` (x and y negated). Every file states its convention (``SPACE=...``) for 3D Slicer.
    Returns organ name -> written paths.
    """
    out_dir = Path(out_dir)
    space = str(coordinate_system).upper()
    if space not in ("LPS", "RAS"):
        raise FadalInputError(f"coordinate_system must be 'LPS' or 'RAS', got {coordinate_system!r}")
    formats = [str(f).lower().lstrip(".") for f in formats]
    unknown = sorted(set(formats) - set(_WRITERS))
    if unknown:
        raise FadalInputError(f"unknown mesh format(s) {unknown}; choose from {list(_WRITERS)}")
    written: dict[str, list[Path]] = {}
    organs: dict[str, Any] = {}
    used: set[str] = set()
    for name, mesh in meshes.items():
        stem = _safe_name(name)
        while stem in used:
            stem += "_"
        used.add(stem)
        out_mesh = mesh
        if space == "RAS":
            # Negating two axes is a rotation (det +1): winding and outward normals are preserved.
            out_mesh = mesh.copy()
            out_mesh.vertices = np.asarray(mesh.vertices) * _LPS_TO_RAS
        paths = [atomic_write_bytes(out_dir / f"{stem}.{fmt}", _WRITERS[fmt](out_mesh, name, space))
                 for fmt in formats]
        written[name] = paths
        meta = mesh.metadata
        organs[name] = {
            "label": meta.get("label"),
            "files": [p.name for p in paths],
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight),
            "mesh_volume_ml": _round(float(mesh.volume) / 1000.0 if mesh.is_watertight else None),
            "label_volume_ml": _round(meta.get("label_volume_ml")),
            "meshed_voxel_volume_ml": _round(meta.get("meshed_voxel_volume_ml")),
            "bounds_mm": np.round(np.asarray(out_mesh.bounds), 2).tolist(),
        }
    write_json({
        "coordinate_system": space,
        "units": "mm",
        "frame": "DICOM patient coordinates of the source CT" if space == "LPS"
        else "DICOM patient coordinates of the source CT with x and y negated (RAS)",
        "note": _SLICER_NOTE,
        "volumes": "mesh_volume_ml: enclosed by the mesh; label_volume_ml: all voxels of the label; "
                   "meshed_voxel_volume_ml: voxels of the meshed (largest) component",
        "organs": organs,
    }, out_dir / "meshes.json")
    return written


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)
