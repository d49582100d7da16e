"""Abdominal atlas propagation with known answers: the TotalSegmentator example CT against altered copies of itself
and against phantom subjects, for every registration method.

The real scan is TotalSegmentator's example (``../shared/data/totalseg_example``: 122 x 101 x 30 voxels at
3 mm, an upper-abdominal slab 9 cm long; its labels are TotalSegmentator model output, not manual). Only
the organs it shares with the phantom are kept (liver, spleen, kidneys, stomach, pancreas, aorta), renumbered
to the phantom's values through ``labels.json``. Cases (atlas -> target; truth = the target's labels):

* ``deform<seed>``: the CT warped by a smooth random displacement field (each component Gaussian noise
  smoothed with sigma ``--deform-sigma-mm``, scaled so the largest displacement is ``--deform-mm``), plus
  Gaussian HU noise (``--noise-hu``); the atlas is the original, truth = its labels warped by the same field.
* ``shift``: the content moved inside the same grid by ``--shift-mm`` (what leaves the field of view is lost,
  air comes in); truth = the labels moved alike.
* ``crop_top``: the superior ``--crop`` of the slices removed; ``crop_left``: the patient-left ``--crop`` of
  the columns removed (most of the spleen, part of the left kidney). The cropped copy's origin is also moved
  by ``--crop-offset-mm`` (as if from another scanner session), so identity is wrong and the initial
  translation has to place the whole atlas on the partial view. The atlas is the whole CT.
* ``phantom<seed>_to_ct`` and ``ct_to_phantom<seed>``: phantom subjects (:func:`fadal.data.phantom.make_subject`,
  site A's scanner) registered onto the real CT and the CT onto them. The CT covers 9 cm of the phantom's
  22 cm, so on a phantom target Dice is scored only in the target's slices where the atlas, placed by
  FADAL's initial translation, shows body (for every case and method alike; elsewhere the atlas cannot say
  anything). ``covered_slices`` per method tells how far each registration stretched the atlas.

Every pair goes through the project's entry point :func:`fadal.amplify.register.register_atlas` with
``RegistrationConfig(workers=1)`` (elastix, the defaults) and ``method="convexadam"`` (its defaults),
each on ``--threads`` threads. References: ``identity`` (the atlas labels resampled by world coordinates)
and ``translation`` (FADAL's initial translation alone, the start both methods share). ``flagged`` is the
calibrated failure rule (:func:`fadal.amplify.result.registration_failures`; with one atlas per target the
NCC ratio is 1, so only the absolute floors can flag).

    PYTHONPATH=src python benchmarks/registration_abdominal.py [--quick] [--methods elastix,convexadam] [--out DIR]

The default run (3 deformations, shift, 2 crops, 2 phantom subjects each way: 10 cases x 2 methods) took
3 min 39 s on 2 shared cores (1 thread per registration; elastix ~5 s, ConvexAdam 10-30 s a pair); ``--quick``: one deformation, the shift, one phantom
subject onto the CT. Writes ``results.json`` (per case and method: per-organ Dice, seconds, the failure
rule's verdict and measures; settings) to ``--out`` and prints a table. Registrations are cached by
content under ``--out``: a re-run only redoes what changed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: TotalSegmentator names of the organs the phantom also has (the phantom's label values are used).
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "aorta")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / n if n else float("nan")


def _arr(img: sitk.Image | Path) -> np.ndarray:
    return sitk.GetArrayFromImage(img if isinstance(img, sitk.Image) else sitk.ReadImage(str(img)))


def restricted_labels(seg: sitk.Image, ts_labels: dict[str, int], values: dict[str, int]) -> sitk.Image:
    """``seg`` with only :data:`ORGANS`, renumbered from TotalSegmentator's values to ``values`` (the phantom's)."""
    src = _arr(seg)
    out = np.zeros(src.shape, np.uint8)
    for name in ORGANS:
        out[src == ts_labels[name]] = values[name]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(seg)
    return img


def smooth_field(ref: sitk.Image, seed: int, max_mm: float, sigma_mm: float) -> sitk.Transform:
    """A smooth random displacement field on ``ref``'s grid whose largest displacement is ``max_mm``."""
    rng = np.random.default_rng(seed)
    shape = _arr(ref).shape
    sigma = sigma_mm / np.asarray(ref.GetSpacing())[::-1]
    comps = [ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(3)]
    field = np.stack(comps, axis=-1)  # x, y, z components (world axes)
    field *= max_mm / np.linalg.norm(field, axis=-1).max()
    img = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    img.CopyInformation(ref)
    return sitk.DisplacementFieldTransform(img)


def warped_copy(ct: sitk.Image, lab: sitk.Image, transform: sitk.Transform, noise_hu: float, seed: int):
    """``ct`` and ``lab`` resampled through ``transform`` on their own grid (air and background outside),
    HU noise added to the scan."""
    img = sitk.Resample(ct, ct, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    arr = _arr(img) + np.random.default_rng(1000 + seed).normal(0.0, noise_hu, _arr(img).shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(np.rint(arr), -1024, 3071).astype(np.int16))
    out.CopyInformation(ct)
    return out, sitk.Resample(lab, lab, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def build_cases(data: Path, dest: Path, args) -> tuple[list[dict], dict[str, int]]:
    """Write every case's atlas and target files under ``dest``; return the cases and the scored label values."""
    from fadal.data.io import write_image
    from fadal.data.phantom import PHANTOM_LABELS, make_subject, scanner_for_site

    dest.mkdir(parents=True, exist_ok=True)
    ts = json.loads((data / "labels.json").read_text())["labels"]
    values = {n: PHANTOM_LABELS[n] for n in ORGANS}
    ct = sitk.ReadImage(str(data / "example_ct_sm.nii.gz"))
    lab = restricted_labels(sitk.ReadImage(str(data / "example_seg.nii.gz")), ts, values)

    def save(name: str, image: sitk.Image, label: sitk.Image) -> tuple[Path, Path]:
        return (write_image(image, dest / f"{name}_0000.nii.gz"), write_image(label, dest / f"{name}.nii.gz"))

    ct_files = save("ct", ct, lab)
    cases: list[dict] = []

    def case(name: str, kind: str, atlas: tuple[Path, Path], target: tuple[Path, Path]) -> None:
        cases.append({"case": name, "kind": kind, "atlas": atlas, "target": target})

    for seed in range(args.deformations):
        img, lb = warped_copy(ct, lab, smooth_field(ct, seed, args.deform_mm, args.deform_sigma_mm), args.noise_hu, seed)
        case(f"deform{seed}", "deformed", ct_files, save(f"deform{seed}", img, lb))
    shift = sitk.TranslationTransform(3, [-v for v in args.shift_mm])  # content moves by +shift_mm
    img, lb = warped_copy(ct, lab, shift, args.noise_hu, 99)
    case("shift", "shifted", ct_files, save("shift", img, lb))
    def moved(*images: sitk.Image) -> list[sitk.Image]:
        for img in images:
            img.SetOrigin([o + d for o, d in zip(img.GetOrigin(), args.crop_offset_mm)])
        return list(images)

    if not args.quick:
        nx, _, nz = ct.GetSize()
        keep_z = int(round(nz * (1 - args.crop)))
        # Array index z grows superiorly (direction +z) here: keep the lower slices.
        sup = 1 if ct.GetDirection()[8] > 0 else -1
        zs = slice(0, keep_z) if sup > 0 else slice(nz - keep_z, nz)
        case("crop_top", "cropped", ct_files, save("crop_top", *moved(ct[:, :, zs], lab[:, :, zs])))
        # Column index i grows towards patient right when direction[0] < 0 (LPS: +x is patient left).
        cut = int(round(nx * args.crop))
        xs = slice(cut, nx) if ct.GetDirection()[0] < 0 else slice(0, nx - cut)
        case("crop_left", "cropped", ct_files, save("crop_left", *moved(ct[xs, :, :], lab[xs, :, :])))
    for seed in range(args.phantoms):
        img, lb = make_subject(np.random.default_rng([args.phantom_seed, seed]), scanner_for_site(0))
        ph = save(f"phantom{seed}", img, lb)
        case(f"phantom{seed}_to_ct", "phantom->ct", ph, ct_files)
        if not args.quick:
            case(f"ct_to_phantom{seed}", "ct->phantom", ct_files, ph)
    return cases, values


def score(pred: sitk.Image | Path, truth: Path, values: dict[str, int], covered: np.ndarray) -> dict[str, float]:
    """Per-organ Dice of ``pred`` against ``truth`` in the axial slices ``covered`` (array axis 0 = z here)."""
    p, t = _arr(pred), _arr(truth)
    p, t = p[covered], t[covered]
    return {n: _dice(p == v, t == v) for n, v in values.items() if (t == v).any() or (p == v).any()}


def covered_slices(warped_image: Path | sitk.Image) -> np.ndarray:
    """Axial slices (array axis 0) where an atlas scan on the target grid shows body (HU > -500 somewhere)."""
    return (_arr(warped_image) > -500).any(axis=(1, 2))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/totalseg_example"))
    ap.add_argument("--out", type=Path, default=Path("runs/registration_abdominal"))
    ap.add_argument("--methods", default="elastix,convexadam")
    ap.add_argument("--deformations", type=int, default=3, help="smooth random deformations (seeds 0..n-1)")
    ap.add_argument("--deform-mm", type=float, default=30.0, help="largest displacement of a deformation")
    ap.add_argument("--deform-sigma-mm", type=float, default=40.0, help="smoothness of a deformation")
    ap.add_argument("--noise-hu", type=float, default=10.0)
    ap.add_argument("--shift-mm", type=float, nargs=3, default=(40.0, -30.0, 9.0), help="content shift x y z (LPS)")
    ap.add_argument("--crop", type=float, default=0.3, help="fraction of slices / columns removed")
    ap.add_argument("--crop-offset-mm", type=float, nargs=3, default=(30.0, -20.0, 15.0),
                    help="the cropped copies' origin moved by this (x y z, LPS): world coordinates no longer agree")
    ap.add_argument("--phantoms", type=int, default=2, help="phantom subjects (each onto the CT and back)")
    ap.add_argument("--phantom-seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1, help="ITK / torch threads")
    ap.add_argument("--quick", action="store_true", help="1 deformation, the shift, 1 phantom subject onto the CT")
    args = ap.parse_args(argv)
    if args.quick:
        args.deformations, args.phantoms = 1, 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not (args.data / "example_ct_sm.nii.gz").exists():
        raise SystemExit(f"{args.data}: TotalSegmentator example not found")

    import itk
    import torch

    from fadal.amplify.register import register_atlas
    from fadal.amplify.result import registration_failures
    from fadal.config import RegistrationConfig
    from fadal.data.io import write_json

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)
    cfgs = {m: RegistrationConfig(workers=1, method=m) for m in methods}
    cases, values = build_cases(args.data, args.out / "cases", args)

    rows = []
    for c in cases:
        (atlas_img, atlas_lab), (target_img, target_lab) = c["atlas"], c["target"]
        row: dict = {"case": c["case"], "kind": c["kind"], "atlas": str(atlas_img), "target": str(target_img)}
        fixed = sitk.ReadImage(str(target_img))
        covered = None
        for m in methods:
            res = register_atlas(target_img, atlas_img, atlas_lab, args.out / m, cfgs[m])
            if covered is None:  # the same for every method (each starts from this translation)
                translation = sitk.TranslationTransform(3, list(res.init_translation_mm))
                placed = sitk.Resample(sitk.ReadImage(str(atlas_img)), fixed, translation, sitk.sitkLinear,
                                       -1024.0, sitk.sitkFloat32)
                covered = covered_slices(placed)
                atlas_label = sitk.ReadImage(str(atlas_lab))
                for ref, t in (("identity", sitk.Transform()), ("translation", translation)):
                    moved = sitk.Resample(atlas_label, fixed, t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
                    row[ref] = {"dice": score(moved, target_lab, values, covered)}
                row["init_translation_mm"] = list(res.init_translation_mm)
                row["scored_slices"] = [int(covered.sum()), int(covered.size)]
            why = registration_failures([res], cfgs[m])[0]
            row[m] = {"dice": score(res.warped_label, target_lab, values, covered), "seconds": res.seconds,
                      "cached": res.cached, "ncc": res.metric_after, "body_dice": res.body_dice,
                      "overlap": res.overlap, "flagged": why,
                      "covered_slices": int(covered_slices(res.warped_image).sum())}
        means = {k: float(np.nanmean(list(row[k]["dice"].values()))) for k in ("identity", "translation", *methods)}
        row["mean_dice"] = means
        print(f"{c['case']:<18}" + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
              + " | " + ", ".join(f"{m} {row[m]['seconds']:.1f} s{' FLAGGED' if row[m]['flagged'] else ''}"
                                  for m in methods), flush=True)
        rows.append(row)

    refs = ("identity", "translation", *methods)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))

    def organ_mean(rs: list[dict], k: str, o: str) -> float:
        v = [r[k]["dice"][o] for r in rs if o in r[k]["dice"]]
        return float(np.mean(v)) if v else float("nan")

    per_kind = {kind: {k: {o: organ_mean([r for r in rows if r["kind"] == kind], k, o) for o in ORGANS} for k in refs}
                for kind in kinds}
    summary = {
        "data": str(args.data), "threads": args.threads, "methods": methods,
        "cases": [r["case"] for r in rows],
        "per_kind_organ_dice": per_kind,
        "per_organ_dice": {k: {o: organ_mean(rows, k, o) for o in ORGANS} for k in refs},
        "seconds_per_pair": {m: float(np.mean([r[m]["seconds"] for r in rows])) for m in methods},
        "flagged": {m: [r["case"] for r in rows if r[m]["flagged"]] for m in methods},
        "settings": {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     **{m: cfgs[m].model_dump(mode="json") for m in methods}},
        "rows": rows,
    }
    write_json(summary, args.out / "results.json")

    short = {"kidney_right": "kid_R", "kidney_left": "kid_L", "pancreas": "pancr", "stomach": "stom"}
    head = "".join(f"{short.get(o, o)[:6]:>7}" for o in ORGANS)
    print(f"\nper-organ Dice (mean over the cases of a kind; {args.threads} thread(s) per registration)")
    print(f"{'kind':<13}{'method':<12}{head}{'mean':>7}{'s/pair':>8}  flagged")
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]
        for k in refs:
            d = per_kind[kind][k]
            sec = f"{np.mean([r[k]['seconds'] for r in rs]):>8.1f}" if k in methods else f"{'':>8}"
            flag = f"  {sum(bool(r[k]['flagged']) for r in rs)}/{len(rs)}" if k in methods else ""
            print(f"{kind:<13}{k:<12}" + "".join(f"{d[o]:>7.3f}" for o in ORGANS)
                  + f"{np.nanmean(list(d.values())):>7.3f}{sec}{flag}")
    print(f"results: {args.out / 'results.json'}")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
