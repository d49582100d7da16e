"""Pictures of a segmentation: offscreen 3D views of the organ meshes and CT slice overlays (PNG, no OpenGL).

3D views use a fixed orthographic camera defined in patient (LPS) coordinates and matplotlib's Agg
renderer: faces are Lambert-shaded from their normals, back faces culled, and all organs' faces drawn
together far-to-near (painter's algorithm), so organs occlude each other correctly. The camera is explicit
rather than matplotlib's mplot3d azimuth/elevation so that the views are anatomically defined:

* ``anterior``: looking from the patient's front, superior up, the patient's right on the image's left
  (as when facing the patient, and as in a coronal radiological view);
* ``oblique``: laparoscopic-like, from anterior, above and to the patient's right, looking at the upper
  abdomen.

Slice overlays are shown in radiological convention after reorienting both volumes to LPS
(``SimpleITK.DICOMOrient``), so a volume stored with flipped axes looks the same as the original.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from fadal.data.io import atomic_write_bytes, resample_like, same_geometry
from fadal.errors import FadalInputError

log = logging.getLogger(__name__)

#: Organ colours (RGB, 0-1): anatomical where it helps (vessels red/blue, gallbladder green), distinct otherwise.
ORGAN_COLORS: dict[str, tuple[float, float, float]] = {
    "liver": (0.64, 0.25, 0.20),
    "spleen": (0.55, 0.33, 0.62),
    "kidney": (0.93, 0.62, 0.45),
    "kidney_right": (0.93, 0.62, 0.45),
    "kidney_left": (0.93, 0.62, 0.45),
    "gallbladder": (0.30, 0.66, 0.27),
    "stomach": (0.96, 0.78, 0.72),
    "pancreas": (0.98, 0.84, 0.36),
    "duodenum": (0.86, 0.66, 0.50),
    "esophagus": (0.82, 0.56, 0.56),
    "small_bowel": (0.95, 0.86, 0.68),
    "colon": (0.80, 0.66, 0.46),
    "urinary_bladder": (0.84, 0.80, 0.30),
    "adrenal_gland": (0.96, 0.52, 0.12),
    "adrenal_gland_right": (0.96, 0.52, 0.12),
    "adrenal_gland_left": (0.96, 0.52, 0.12),
    "aorta": (0.86, 0.08, 0.10),
    "inferior_vena_cava": (0.16, 0.30, 0.82),
    "portal_vein": (0.25, 0.62, 0.95),
    "portal_vein_and_splenic_vein": (0.25, 0.62, 0.95),
    "splenic_vein": (0.25, 0.62, 0.95),
    "hepatic_vein": (0.45, 0.45, 0.95),
    "hepatic_vessel": (0.45, 0.45, 0.95),
    "tumor": (0.10, 0.90, 0.80),
    "lesion": (0.10, 0.90, 0.80),
}

#: Fallback for other names: tab10-like, chosen by a stable hash of the name.
_FALLBACK = [
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
]

ANTERIOR_VIEW = "anterior"
OBLIQUE_VIEW = "oblique"
#: Render size: (width, height) in inches at _DPI.
RENDER_SIZE_IN = (8.0, 7.0)
OVERLAY_SIZE_IN = (13.0, 5.6)
_DPI = 100
#: Total faces drawn in a 3D view (before back-face culling); larger meshes are simplified for display only.
RENDER_MAX_FACES = 60000


def organ_color(name: str, colors: Mapping[str, tuple] | None = None) -> tuple[float, float, float]:
    """Colour of an organ: ``colors`` first, then :data:`ORGAN_COLORS` (exact name, name without
    ``_left``/``_right``, longest known prefix), else a fixed fallback colour for that name."""
    for table in (colors or {}, ORGAN_COLORS):
        if name in table:
            return _rgb(table[name])
    key = name.lower()
    for suffix in ("_left", "_right", "_l", "_r"):
        if key.endswith(suffix) and key[: -len(suffix)] in ORGAN_COLORS:
            return ORGAN_COLORS[key[: -len(suffix)]]
    prefixes = [k for k in ORGAN_COLORS if key.startswith(k)]
    if prefixes:
        return ORGAN_COLORS[max(prefixes, key=len)]
    return _FALLBACK[zlib.crc32(name.encode("utf-8")) % len(_FALLBACK)]


def _rgb(color: Any) -> tuple[float, float, float]:
    c = np.asarray(color, dtype=float).ravel()[:3]
    if c.max() > 1.0:  # 0-255 given
        c = c / 255.0
    return tuple(float(x) for x in np.clip(c, 0, 1))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- matplotlib

def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global state or backend choice.
    return fig


def _save_png(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return atomic_write_bytes(Path(path), buf.getvalue())


def _legend(fig: Any, names: list[str], colors: Mapping[str, tuple] | None, **kwargs: Any) -> None:
    from matplotlib.patches import Patch

    if names:
        handles = [Patch(facecolor=organ_color(n, colors), edgecolor="0.3", label=n.replace("_", " "))
                   for n in names]
        fig.legend(handles=handles, frameon=False, fontsize=9, **kwargs)


# ---------------------------------------------------------------------------------------------- 3D views

def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _camera(view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(screen right, screen up, towards the viewer) as unit vectors in LPS world coordinates."""
    if view == ANTERIOR_VIEW:
        towards = np.array([0.0, -1.0, 0.0])  # the viewer stands anterior (-y in LPS)
        up_hint = np.array([0.0, 0.0, 1.0])  # superior up
    elif view == OBLIQUE_VIEW:
        # Anterior (-y), above (+z) and to the patient's right (-x), as a laparoscope from a right-sided port.
        towards = _unit([-0.5, -1.0, 0.7])
        up_hint = np.array([0.0, 0.0, 1.0])
    else:
        raise ValueError(f"unknown view {view!r}")
    up = _unit(up_hint - np.dot(up_hint, towards) * towards)
    right = np.cross(up, towards)  # right x up = towards: a right-handed camera, no mirror image
    return right, up, towards


def _simplify_for_display(vertices: np.ndarray, faces: np.ndarray, cell_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering on a ``cell_mm`` grid (display only: fast and good enough at screen resolution)."""
    keys = np.floor(vertices / cell_mm).astype(np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    sums = np.zeros((len(first), 3))
    np.add.at(sums, inverse, vertices)
    new_vertices = sums / np.bincount(inverse, minlength=len(first))[:, None]
    new_faces = inverse[faces]
    keep = ((new_faces[:, 0] != new_faces[:, 1]) & (new_faces[:, 1] != new_faces[:, 2])
            & (new_faces[:, 0] != new_faces[:, 2]))
    return new_vertices, new_faces[keep]


def _display_geometry(meshes: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    total = sum(len(m.faces) for m in meshes.values())
    out = {}
    for name, mesh in meshes.items():
        v = np.asarray(mesh.vertices, dtype=float)
        f = np.asarray(mesh.faces, dtype=np.int64)
        if total > RENDER_MAX_FACES and len(f) > 0:
            # Faces scale with area / cell^2: choose the cell that brings this mesh to its share of the budget.
            edge = float(np.mean(np.linalg.norm(v[f[:, 0]] - v[f[:, 1]], axis=1)))
            cell = edge * np.sqrt(total / RENDER_MAX_FACES) * 1.1
            v, f = _simplify_for_display(v, f, cell)
        out[name] = (v, f)
    return out


def _draw_meshes(ax: Any, geometry: Mapping[str, tuple[np.ndarray, np.ndarray]], view: str,
                 colors: Mapping[str, tuple] | None) -> None:
    from matplotlib.collections import PolyCollection

    right, up, towards = _camera(view)
    light = _unit(towards + 0.6 * up + 0.3 * right)  # headlight, a little from above
    polys, shades, depths = [], [], []
    for name, (v, f) in geometry.items():
        if len(f) == 0:
            continue
        tri = v[f]  # (n, 3, 3)
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norms = np.linalg.norm(normals, axis=1)
        ok = norms > 0
        normals[ok] /= norms[ok, None]
        front = ok & (normals @ towards > 0)  # closed, outward-oriented meshes: back faces are hidden anyway
        tri, normals = tri[front], normals[front]
        screen = np.stack([tri @ right, tri @ up], axis=-1)
        depth = (tri @ towards).mean(axis=1)
        lambert = np.clip(normals @ light, 0.0, 1.0)
        base = np.asarray(organ_color(name, colors))
        shade = np.clip(base[None, :] * (0.35 + 0.75 * lambert[:, None]) + 0.12 * lambert[:, None] ** 8, 0, 1)
        polys.append(screen)
        shades.append(shade)
        depths.append(depth)
    if not polys:
        return
    screen = np.concatenate(polys)
    shade = np.concatenate(shades)
    order = np.argsort(np.concatenate(depths))  # far (small depth towards the viewer) first
    coll = PolyCollection(screen[order], facecolors=shade[order], edgecolors=shade[order], linewidths=0.15,
                          antialiaseds=False)
    ax.add_collection(coll)
    lo, hi = screen.reshape(-1, 2).min(axis=0), screen.reshape(-1, 2).max(axis=0)
    pad = 0.04 * float(np.max(hi - lo))
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)


def _orientation_triad(fig: Any, view: str) -> None:
    """Small arrows in the figure's lower-left corner for the patient's Right, Anterior and Superior."""
    right, up, _ = _camera(view)
    ax = fig.add_axes((0.0, 0.0, 0.14, 0.16))
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.set_axis_off()
    for label, world in (("R", [-1.0, 0, 0]), ("A", [0, -1.0, 0]), ("S", [0, 0, 1.0])):
        d = np.array([np.dot(world, right), np.dot(world, up)])
        if np.linalg.norm(d) < 0.2:  # pointing at the viewer
            ax.text(0, 0, "\u2299", fontsize=12, ha="center", va="center", color="0.25")
            ax.text(0.35, -0.35, label, fontsize=9, ha="center", va="center", color="0.25")
            continue
        ax.annotate("", xy=tuple(0.8 * d), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="0.25", lw=1.2))
        ax.text(*(1.15 * d), label, fontsize=9, ha="center", va="center", color="0.25")


_VIEW_TITLES = {
    ANTERIOR_VIEW: "Anterior view (patient's right on the image left)",
    OBLIQUE_VIEW: "Oblique view: from anterior, superior, patient's right",
}


def render_views(meshes: Mapping[str, Any], out_dir: Path, colors: Mapping[str, tuple] | None = None
                 ) -> dict[str, Path]:
    """Offscreen PNGs ``out_dir/view_anterior.png`` and ``out_dir/view_oblique.png`` of the organ meshes
    (LPS world coordinates, e.g. from :func:`fadal.navigation.meshes.organ_meshes`), with a legend.
    Returns view name -> path."""
    if not meshes:
        log.warning("no organ meshes to render (empty label map?): the views will say so")
    out_dir = Path(out_dir)
    geometry = _display_geometry(meshes)
    names = list(meshes)
    paths: dict[str, Path] = {}
    for view in (ANTERIOR_VIEW, OBLIQUE_VIEW):
        fig = _figure(*RENDER_SIZE_IN)
        ax = fig.add_axes((0.02, 0.16, 0.96, 0.78))
        ax.set_aspect("equal", adjustable="box")
        ax.set_axis_off()
        _draw_meshes(ax, geometry, view, colors)
        if not meshes:
            ax.text(0.5, 0.5, "no organ found", transform=ax.transAxes, ha="center", va="center", fontsize=14)
        _orientation_triad(fig, view)
        fig.suptitle(_VIEW_TITLES[view], fontsize=11, y=0.985)
        _legend(fig, names, colors, loc="lower center", ncol=min(len(names), 3), bbox_to_anchor=(0.57, 0.0))
        paths[view] = _save_png(fig, out_dir / f"view_{view}.png")
    return paths


# ------------------------------------------------------------------------------------------- slice views

def _slice_panels(image: sitk.Image, label: sitk.Image, center: np.ndarray) -> list[tuple[Any, ...]]:
    """(title, CT slice, label slice, extent in mm, edge letters left/right/top/bottom) for the axial, coronal
    and sagittal views of LPS-oriented volumes, already flipped for display with ``origin='upper'``.

    Array axes after DICOMOrient('LPS'): (z: inferior->superior, y: anterior->posterior, x: right->left).
    Axial: rows anterior->posterior, columns right->left (radiological: patient's right on the image left).
    Coronal: rows superior->inferior, columns right->left. Sagittal: rows superior->inferior, columns
    anterior->posterior (anterior on the image left).
    """
    ct = sitk.GetArrayViewFromImage(image)
    lab = sitk.GetArrayViewFromImage(label)
    sx, sy, sz = image.GetSpacing()
    nz, ny, nx = ct.shape
    i, j, k = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(center, (nx, ny, nz)))
    return [
        ("Axial", ct[k], lab[k], (0, nx * sx, ny * sy, 0), ("R", "L", "A", "P")),
        ("Coronal", ct[::-1, j, :], lab[::-1, j, :], (0, nx * sx, nz * sz, 0), ("R", "L", "S", "I")),
        ("Sagittal", ct[::-1, :, i], lab[::-1, :, i], (0, ny * sy, nz * sz, 0), ("A", "P", "S", "I")),
    ]


def overlay_views(image: sitk.Image, label: sitk.Image, labels: Mapping[str, int], out_path: Path,
                  hu_window: tuple[float, float] = (-160, 240), colors: Mapping[str, tuple] | None = None
                  ) -> Path:
    """One PNG: axial, coronal and sagittal CT slices through the labelled organs' centre of mass, grey CT
    (``hu_window``) under a translucent coloured label overlay, radiological convention, true physical
    aspect ratio, and a legend of the organs present. A label on another grid is resampled onto the CT
    through world coordinates (nearest neighbour)."""
    if image.GetDimension() != 3 or label.GetDimension() != 3:
        raise FadalInputError("overlay_views needs 3D image and label volumes")
    if same_geometry(image, label) is not None:
        log.info("label grid differs from the CT (%s); resampling it onto the CT for display",
                 same_geometry(image, label))
        label = resample_like(label, image, is_label=True)
    image = sitk.DICOMOrient(image, "LPS")
    label = sitk.DICOMOrient(label, "LPS")

    lab = sitk.GetArrayViewFromImage(label)
    values = {int(v): name for name, v in labels.items() if int(v) != 0}
    present = [v for v in np.unique(lab) if int(v) in values]
    organ_mask = np.isin(lab, present)
    if organ_mask.any():
        center = np.argwhere(organ_mask).mean(axis=0)[::-1]  # (x, y, z) index
    else:
        center = (np.asarray(image.GetSize()) - 1) / 2.0
    lut = np.zeros((int(max(lab.max(), max(values, default=0))) + 1, 4))
    for v in present:
        lut[int(v), :3] = organ_color(values[int(v)], colors)
        lut[int(v), 3] = 0.45
    lo, hi = float(hu_window[0]), float(hu_window[1])

    fig = _figure(*OVERLAY_SIZE_IN)
    panels = _slice_panels(image, label, center)
    widths = [p[3][1] for p in panels]
    grid = fig.add_gridspec(1, 3, width_ratios=widths, left=0.02, right=0.98, top=0.90, bottom=0.16, wspace=0.06)
    for col, (title, ct, lab2d, extent, letters) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(np.asarray(ct, dtype=np.float32), cmap="gray", vmin=lo, vmax=hi, extent=extent,
                  interpolation="nearest", origin="upper", aspect="equal")
        ax.imshow(lut[np.asarray(lab2d).astype(np.int64)], extent=extent, interpolation="nearest",
                  origin="upper", aspect="equal")
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right, top, bottom = letters
        style = dict(transform=ax.transAxes, color="yellow", fontsize=10, fontweight="bold")
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    names = [values[int(v)] for v in present]
    fig.suptitle(f"CT (window {lo:g} to {hi:g} HU) with organ labels, radiological convention", fontsize=11)
    _legend(fig, names, colors, loc="lower center", ncol=min(max(len(names), 1), 6), bbox_to_anchor=(0.5, 0.0))
    return _save_png(fig, Path(out_path))
