"""`fadal predict` for one CT: segment it, then export what navigation needs (label map, meshes, views,
DICOM-SEG), with the seconds each step took; ``summary.json`` is written last so a re-run skips finished cases."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fadal.data.io import read_image, write_image, write_json
from fadal.model.infer import predict_image
from fadal.model.net import pick_device
from fadal.records import Plan


@dataclass
class ExportOptions:
    """What `fadal predict` writes besides the label map."""

    largest_component: bool = True
    fill_holes: bool = True
    meshes: bool = True
    mesh_formats: tuple[str, ...] = ("stl", "obj", "vtp")
    views: bool = True
    dicom_seg: bool = True  # only for DICOM-series inputs
    slicer: bool = False  # <case>/<case>.seg.nrrd + scene.mrml for 3D Slicer


def predict_case(model: torch.nn.Module, labels: dict[str, int], plan: Plan, source: Path, case_id: str,
                 out: Path, options: ExportOptions | None = None, series_uid: str | None = None) -> dict:
    """Segment one CT and export what navigation needs; ``out/<case>/summary.json`` is written last.

    Outputs: ``out/<case>.nii.gz`` (label map, input geometry), ``out/<case>/meshes/`` (STL/OBJ/VTP in LPS
    mm + meshes.json), ``out/<case>/views/`` (anterior/oblique renders, tri-planar overlay),
    ``out/<case>/seg.dcm`` (DICOM-SEG, DICOM inputs only)."""
    options = options or ExportOptions()
    case_dir = out / case_id
    timings: dict[str, float] = {}
    t = time.perf_counter()
    image = read_image(source, series_uid)
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    label, _ = predict_image(model, image, plan, pick_device())
    timings["network"] = time.perf_counter() - t
    t = time.perf_counter()
    if options.largest_component or options.fill_holes:
        from fadal.navigation.meshes import postprocess_label

        label = postprocess_label(label, options.largest_component, options.fill_holes)
    write_image(label, out / f"{case_id}.nii.gz")
    outputs: dict[str, object] = {"label": str(out / f"{case_id}.nii.gz")}
    timings["postprocess+write"] = time.perf_counter() - t
    meshes = {}
    if options.meshes or options.views:
        from fadal.navigation.meshes import organ_meshes, write_meshes

        t = time.perf_counter()
        meshes = organ_meshes(label, labels, keep_largest=options.largest_component)
        if options.meshes:
            written = write_meshes(meshes, case_dir / "meshes", formats=options.mesh_formats)
            outputs["meshes"] = {k: [str(p) for p in v] for k, v in written.items()}
        timings["meshes"] = time.perf_counter() - t
    if options.views:
        from fadal.navigation.render import overlay_views, render_views

        t = time.perf_counter()
        views = render_views(meshes, case_dir / "views")
        views["overlay"] = overlay_views(image, label, labels, case_dir / "views" / "overlay.png")
        outputs["views"] = {k: str(v) for k, v in views.items()}
        timings["views"] = time.perf_counter() - t
    if options.dicom_seg and Path(source).is_dir():
        from fadal.navigation.dicom_seg import write_dicom_seg

        t = time.perf_counter()
        outputs["dicom_seg"] = str(write_dicom_seg(label, Path(source), labels, case_dir / "seg.dcm",
                                                   series_uid=series_uid))
        timings["dicom_seg"] = time.perf_counter() - t
    if options.slicer:
        t = time.perf_counter()
        outputs.update(_slicer_files(label, labels, Path(source), series_uid, case_dir, case_id,
                                     outputs.get("meshes", {})))
        timings["slicer"] = time.perf_counter() - t
    summary = {"case": case_id, "source": str(source), "outputs": outputs, "seconds": timings,
               "organs": sorted(meshes)}
    write_json(summary, case_dir / "summary.json")
    return summary


def _slicer_files(label, labels: dict[str, int], source: Path, series_uid: str | None, case_dir: Path, case_id: str,
                  meshes: dict[str, list[str]]) -> dict[str, str]:
    """``<case>.seg.nrrd`` and ``scene.mrml`` (the CT: the input file, or a DICOM series' first file, which
    Slicer's volume reader takes as the series' archetype)."""
    from fadal.navigation.render import organ_color
    from fadal.navigation.slicer import write_scene, write_seg_nrrd

    seg = write_seg_nrrd(label, labels, case_dir / f"{case_id}.seg.nrrd")
    ct = source
    if source.is_dir():
        from fadal.data.dicom import list_series

        series = list_series(source)
        ct = Path(series[series_uid][0] if series_uid in series else next(iter(series.values()))[0])
    vtp = {name: Path(p) for name, paths in meshes.items() for p in paths if str(p).endswith(".vtp")}
    scene = write_scene(case_dir / "scene.mrml", ct, seg, vtp, {name: organ_color(name) for name in vtp})
    return {"slicer_segmentation": str(seg), "slicer_scene": str(scene)}
