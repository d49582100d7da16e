"""`fadal predict`, `fadal export`, `fadal serve`: inference on files or through a PACS (DICOMweb), the
deployable model package, and the watch loop of the navigation workflow.

A typer sub-app: cli.py adds it to `fadal` without a group name. Nothing here imports Flower or the
registration stack, so a hospital's inference machine runs these with the package from `fadal export`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fadal.errors import FadalInputError

navigation_app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
console = Console()

_URL = typer.Option(None, "--dicomweb", help="DICOMweb root of the PACS (e.g. https://pacs/dicom-web): read the CT "
                    "there (WADO-RS) and store the DICOM-SEG back (STOW-RS).")
_USER = typer.Option(None, help="Basic-auth user (or FADAL_DICOMWEB_USER); the password only from the "
                     "FADAL_DICOMWEB_PASSWORD environment variable.")
_CA = typer.Option(None, help="CA bundle (PEM) that verifies the PACS's TLS certificate.")
_VERIFY = typer.Option(True, help="Verify the PACS's TLS certificate (a bearer token comes from FADAL_DICOMWEB_TOKEN).")


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
    raise typer.Exit(2)


def _access(url: str, user: str | None, ca_bundle: Path | None, verify_tls: bool):
    from fadal.data.dicomweb import PacsAccess

    return PacsAccess.from_env(url, user=user, ca_bundle=ca_bundle, verify_tls=verify_tls)


def _options(meshes: bool, views: bool, dicom_seg: bool, largest_component: bool, fill_holes: bool,
             slicer: bool = True):
    from fadal.navigation.predict import ExportOptions

    return ExportOptions(largest_component=largest_component, fill_holes=fill_holes, meshes=meshes, views=views,
                         dicom_seg=dicom_seg, slicer=slicer)


@navigation_app.command()
def predict(
    inputs: Optional[list[Path]] = typer.Argument(None, help="NIfTI file(s), folder(s) of NIfTI files, or DICOM "
                                                  "series folder(s); none with --dicomweb."),
    model: Path = typer.Option(..., help="Checkpoint (model.pt / global_model.pt) or a package from `fadal export`."),
    out: Path = typer.Option(Path("predictions"), help="Output folder: <case>.nii.gz label maps in the input's geometry, "
                             "<case>/meshes, <case>/views, <case>/seg.dcm, <case>/<case>.seg.nrrd."),
    meshes: bool = typer.Option(True, help="Organ surface meshes (STL, OBJ, VTP; LPS world mm)."),
    views: bool = typer.Option(True, help="3D renders (anterior, oblique) and a CT overlay PNG."),
    dicom_seg: bool = typer.Option(True, help="DICOM-SEG next to DICOM-series inputs."),
    slicer: bool = typer.Option(True, help="3D Slicer files: <case>.seg.nrrd (named, coloured segments) and a "
                                "scene.mrml with the CT, the segmentation and the meshes."),
    largest_component: bool = typer.Option(True, help="Keep each organ's largest connected component."),
    fill_holes: bool = typer.Option(True, help="Fill holes inside each organ."),
    series: Optional[str] = typer.Option(None, help="SeriesInstanceUID, when a DICOM folder or study holds several series."),
    dicomweb: Optional[str] = _URL,
    study: Optional[str] = typer.Option(None, help="With --dicomweb: the StudyInstanceUID to segment."),
    user: Optional[str] = _USER,
    ca_bundle: Optional[Path] = _CA,
    verify_tls: bool = _VERIFY,
) -> None:
    """Segment CT volumes and export label maps, surface meshes, views, DICOM-SEG and a Slicer scene.

    Label maps are written on each input's exact voxel grid. A folder run skips finished cases. With
    --dicomweb the CT comes from the PACS and the SEG goes back to it."""
    from fadal.navigation.model_package import load_model

    options = _options(meshes, views, dicom_seg, largest_component, fill_holes, slicer)
    try:
        if dicomweb is not None:
            if inputs:
                raise FadalInputError("give input files or --dicomweb with --study, not both")
            if not study:
                raise FadalInputError("--dicomweb needs --study STUDY_INSTANCE_UID")
            from fadal.navigation.pacs import predict_from_pacs

            access = _access(dicomweb, user, ca_bundle, verify_tls)
            loaded = load_model(model)
            summary = predict_from_pacs(loaded, access, study, out, series, options)
            p = summary["pacs"]
            console.print(f"study {study}: series {p['ct_series']} segmented, SEG {p['seg_series']} stored in "
                          f"{p['url']} in {summary['seconds']['pacs_total']:.1f} s; files in {out / summary['case']}")
            return
        if not inputs:
            raise FadalInputError("no input: give CT files or folders, or --dicomweb URL --study UID")
        loaded = load_model(model)
        n = _predict_files(loaded, inputs, out, options, series)
    except FadalInputError as err:
        _fail(err)
    labels = loaded.labels
    console.print(f"{n} case(s) in {out} (labels: {', '.join(k for k in labels if labels[k])})")


def _predict_files(loaded, inputs: list[Path], out: Path, options, series: str | None) -> int:
    from fadal.data.io import check_readable
    from fadal.navigation.predict import predict_case

    files = _expand_inputs(inputs)
    for _, path in files:  # every input checked before the first case is written
        check_readable(path)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as prog:
        task = prog.add_task("cases", total=len(files))
        for case_id, path in files:
            done = out / case_id / "summary.json"
            if done.exists() and done.stat().st_mtime > path.stat().st_mtime:
                prog.advance(task)
                continue
            prog.update(task, description=case_id)
            predict_case(loaded.network, loaded.labels, loaded.plan, path, case_id, out, options, series_uid=series)
            prog.advance(task)
    return len(files)


def _expand_inputs(inputs: list[Path]) -> list[tuple[str, Path]]:
    from fadal.data.site import IMAGE_SUFFIXES, strip_suffix

    found: list[tuple[str, Path]] = []
    for p in inputs:
        if not p.exists():
            raise FadalInputError(f"{p}: not found")
        if p.is_dir():
            vols = sorted(f for f in p.iterdir() if f.name.endswith(IMAGE_SUFFIXES))
            if vols:
                found += [(strip_suffix(f.name).removesuffix("_0000"), f) for f in vols]
            else:  # a DICOM series folder (read, and checked, when its turn comes)
                found.append((p.name, p))
        else:
            found.append((strip_suffix(p.name).removesuffix("_0000"), p))
    return found


@navigation_app.command()
def export(
    model: Path = typer.Option(..., help="Checkpoint (model.pt / global_model.pt) to package."),
    out: Path = typer.Option(..., help="Package folder: manifest.json, model.pt2 (torch.export graph), weights.pt."),
    check_ct: Optional[Path] = typer.Option(None, help="A CT to run the export check on (default: a synthetic volume "
                                            "of several sliding windows)."),
) -> None:
    """Write a deployable model package: an exported graph (torch.export), weights, plan and labels, checked against the eager
    model (every logit within 1e-4) at export; `fadal predict --model DIR` runs it without the training stack."""
    from fadal.navigation.model_package import export_package

    try:
        manifest = export_package(model, out, check_ct)
    except FadalInputError as err:
        _fail(err)
    c = manifest.check
    console.print(f"package: {out} (torch.export graph; check on {c.volume}, {c.windows} windows: max |graph - eager| "
                  f"{c.max_abs_logit_diff:.2e} <= {c.tolerance:g}, labels identical: {c.labels_identical})")


@navigation_app.command()
def serve(
    dicomweb: str = typer.Option(..., "--dicomweb", help="DICOMweb root of the PACS to watch."),
    model: Path = typer.Option(..., help="Checkpoint or package from `fadal export`."),
    out: Path = typer.Option(Path("navigation"), help="Where each study's files and serve_state.json go."),
    match: list[str] = typer.Option(["StudyDescription=*planning*"], help="QIDO-RS study filter(s) KEYWORD=VALUE "
                                    "(* wildcards); every matching study with a CT series is processed once."),
    interval: float = typer.Option(30.0, min=0.1, help="Seconds between polls."),
    once: bool = typer.Option(False, help="One poll, then exit (for cron jobs and tests)."),
    meshes: bool = typer.Option(True, help="Organ surface meshes."),
    views: bool = typer.Option(True, help="3D renders and a CT overlay PNG."),
    slicer: bool = typer.Option(True, help="3D Slicer files (seg.nrrd, scene.mrml)."),
    user: Optional[str] = _USER,
    ca_bundle: Optional[Path] = _CA,
    verify_tls: bool = _VERIFY,
) -> None:
    """Watch the PACS for CT studies tagged for planning; segment each once and store its SEG in the PACS.

    A study whose CT already has a SEG in the PACS (or is recorded in serve_state.json) is skipped, so a
    restart redoes nothing. One line per study; one error line per failure; the loop keeps running."""
    from fadal.navigation.model_package import load_model
    from fadal.navigation.serve import parse_filters, watch

    try:
        filters = parse_filters(match)
        access = _access(dicomweb, user, ca_bundle, verify_tls)
        loaded = load_model(model)
    except FadalInputError as err:
        _fail(err)
    console.print(f"watching {access.shown_url} for studies {filters} every {interval:g} s (model: {loaded.source})")
    options = _options(meshes, views, True, True, True, slicer)
    watch(loaded, access, out, filters, options, interval=interval, once=once, log=console.print)
