"""Failure detection calibrated on OpenKBP: label Dice of the pairs each criterion flags against those it passes.

The setting of ``benchmarks/label_efficiency.py`` (where 41 of 96 registrations were flagged on body-mask
Dice alone while their warped labels were as good as the accepted ones): per site, ``--atlases`` atlases
(the most completely annotated of a spread pool of 'train' scans) registered onto ``--targets`` other
scans of the pool, with ``fadal amplify``'s default registration. Every target has real labels, so each
pair's *label Dice* (mean over the organs both drew) tells how good its warped labels really are.
Gross failures are made on purpose: the first atlas of each site flipped craniocaudally (upside down)
and antero-posteriorly (face at the back), onto ``--gross-targets`` targets.

The NCC ratio (an atlas's NCC over the best atlas's on the same scan, ``min_ncc_ratio``) is computed
over the atlases of each target, flipped ones included (as an amplification judges them together).

Classes: ``good`` = label Dice >= ``--good-fraction`` x the median label Dice of the normal pairs
(as good as the accepted ones); ``gross`` = the flipped atlases and any pair below ``--gross-fraction``
x that median. Per criterion (body-mask Dice, NCC, overlap) the table shows the ranges per class, the
fraction of good pairs the configured threshold passes and the fraction of gross ones it catches; and the
highest threshold that still passes 95 % of the good pairs (their 5th percentile) with the fraction of
gross failures it would catch.

    PYTHONPATH=src python benchmarks/registration_calibration.py [--methods elastix,convexadam] [--quick]

Writes ``calibration.json`` (per pair, per class, per criterion; per-organ Dice and seconds per method) to
``--out`` and prints the tables. Registrations are cached by content under ``--out``: a re-run only
redoes what changed (the default, 3 sites x (3 x 6 + 2 x 3) = 72 pairs, ~6 min on 2 idle cores for elastix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids, spread  # noqa: E402

CRITERIA = {"body_dice": "min_body_dice", "metric_after": "min_ncc", "ncc_ratio": "min_ncc_ratio", "overlap": "min_overlap"}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / n if n else float("nan")


def organ_dice(pred: Path, truth: Path, organs: dict[str, int]) -> dict[str, float]:
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))
    t = sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))
    return {name: _dice(p == v, t == v) for name, v in organs.items()}


def flipped_copy(image: Path, label: Path, axis: str, dest: Path) -> tuple[Path, Path]:
    """The scan and its label with the array reversed along the craniocaudal ('cc') or antero-posterior
    ('ap') axis, geometry kept: an atlas whose orientation metadata is wrong."""
    from fadal.amplify.geometry import axial_array_axis
    from fadal.data.io import write_image

    out = []
    for src, kind in ((image, "image"), (label, "label")):
        img = sitk.ReadImage(str(src))
        arr = sitk.GetArrayFromImage(img)
        ax = axial_array_axis(img) if axis == "cc" else 1  # (z, y, x): y is antero-posterior in axial scans
        flipped = sitk.GetImageFromArray(np.flip(arr, ax).copy())
        flipped.CopyInformation(img)
        out.append(write_image(flipped, dest / f"{src.name.split('.')[0]}_flip{axis}_{kind}.nii.gz"))
    return out[0], out[1]


def suggest(good: list[float]) -> float:
    """The highest threshold (0.01 steps) that still passes >= 95 % of the good pairs: their 5th percentile."""
    return round(float(np.floor(np.percentile(good, 5) * 100) / 100), 2) if good else float("nan")


def calibrate(rows: list[dict], cfg, good_fraction: float, gross_fraction: float) -> dict:
    """Classes and per-criterion table of one method's rows (each with 'label_dice', 'gross', measures)."""
    normal = [r["label_dice"] for r in rows if not r["gross"] and np.isfinite(r["label_dice"])]
    median = float(np.median(normal)) if normal else float("nan")
    for r in rows:
        d = r["label_dice"]
        r["class"] = ("gross" if r["gross"] or not d >= gross_fraction * median
                      else "good" if d >= good_fraction * median else "mediocre")
    table = {}
    for attr, field in CRITERIA.items():
        thr = getattr(cfg, field)
        by = {c: [r[attr] for r in rows if r["class"] == c and np.isfinite(r[attr])] for c in ("good", "mediocre", "gross")}
        flagged = [r for r in rows if not r[attr] >= thr]
        passed = [r for r in rows if r[attr] >= thr]
        table[field] = {
            "threshold": thr, "suggested": (t := suggest(by["good"])),
            "gross_caught_at_suggested": _frac([not v >= t for v in by["gross"]]),
            **{f"{c}_range": [round(min(v), 3), round(max(v), 3)] if v else None for c, v in by.items()},
            "good_pass": _frac([v >= thr for v in by["good"]]), "gross_caught": _frac([not v >= thr for v in by["gross"]]),
            "label_dice_flagged": _mean([r["label_dice"] for r in flagged if not r["gross"]]),
            "label_dice_passed": _mean([r["label_dice"] for r in passed if not r["gross"]]),
            "n_flagged": len(flagged),
        }
    return {"median_normal_label_dice": median, "criteria": table}


def _frac(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 3) if flags else None


def _mean(v: list[float]) -> float | None:
    v = [x for x in v if np.isfinite(x)]
    return round(float(np.mean(v)), 4) if v else None


def pairs_for(meta: dict, site: str, n_atlases: int, n_targets: int) -> tuple[list[str], list[str]]:
    pool = spread(site_case_ids(meta, site, "train"), n_atlases + n_targets)
    atlases = sorted(pool, key=lambda c: (-len(meta[c]["annotated"]), pool.index(c)))[:n_atlases]
    return atlases, [c for c in pool if c not in atlases]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/openkbp"))
    ap.add_argument("--out", type=Path, default=Path("runs/registration_calibration"))
    ap.add_argument("--sites", default="A,B,C")
    ap.add_argument("--atlases", type=int, default=3)
    ap.add_argument("--targets", type=int, default=6)
    ap.add_argument("--gross-targets", type=int, default=3)
    ap.add_argument("--methods", default="elastix")
    ap.add_argument("--good-fraction", type=float, default=0.9)
    ap.add_argument("--gross-fraction", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one site, 1 atlas, 2 targets, 1 gross target")
    args = ap.parse_args(argv)
    if args.quick:
        args.sites, args.atlases, args.targets, args.gross_targets = "A", 1, 2, 1

    from fadal.amplify.register import register_many
    from fadal.amplify.result import ncc_ratios, registration_failures
    from fadal.config import RegistrationConfig
    from fadal.data.io import write_json

    meta = json.loads((args.data / "cases.json").read_text())
    organs = {n: v for n, v in json.loads((args.data / "dataset.json").read_text())["labels"].items() if v}
    img = lambda c: args.data / "imagesTr" / f"{c}_0000.nii.gz"  # noqa: E731
    lab = lambda c: args.data / "labelsTr" / f"{c}.nii.gz"  # noqa: E731
    flips = args.out / "flipped"
    flips.mkdir(parents=True, exist_ok=True)
    jobs = []  # (site, atlas id, target id, gross kind, (fixed, atlas image, atlas label))
    for site in args.sites.split(","):
        atlases, targets = pairs_for(meta, site, args.atlases, args.targets)
        jobs += [(site, a, t, None, (img(t), img(a), lab(a))) for a in atlases for t in targets]
        for axis in ("cc", "ap"):
            fimg, flab = flipped_copy(img(atlases[0]), lab(atlases[0]), axis, flips)
            jobs += [(site, atlases[0], t, f"flip_{axis}", (img(t), fimg, flab)) for t in targets[: args.gross_targets]]

    summary: dict = {"settings": vars(args) | {"data": str(args.data), "out": str(args.out)}, "methods": {}}
    for method in args.methods.split(","):
        cfg = RegistrationConfig(method=method, workers=args.workers)
        done = [0]

        def progress(res, n=len(jobs)):
            done[0] += 1
            print(f"  [{method} {done[0]}/{n}] {res.moving.name} -> {res.fixed.name}: {res.seconds:.1f} s"
                  f"{' (cached)' if res.cached else ''}", flush=True)

        results = register_many([j[4] for j in jobs], args.out / method, cfg, progress, errors="record")
        # What the product decides: every atlas registered onto a scan judged together (the NCC ratio).
        flagged, ratio = [None] * len(jobs), [float("nan")] * len(jobs)
        for target in {j[2] for j in jobs}:
            idx = [i for i, j in enumerate(jobs) if j[2] == target]
            for i, why, q in zip(idx, registration_failures([results[i] for i in idx], cfg),
                                 ncc_ratios([results[i] for i in idx])):
                flagged[i], ratio[i] = why, q
        rows = []
        for k, ((site, atlas, target, gross, _), res) in enumerate(zip(jobs, results)):
            both = {n: organs[n] for n in organs if n in meta[atlas]["annotated"] and n in meta[target]["annotated"]}
            dice = organ_dice(res.warped_label, lab(target), both) if res.error is None else {n: 0.0 for n in both}
            rows.append({"site": site, "atlas": atlas, "target": target, "gross": gross, "dice": dice,
                         "label_dice": float(np.nanmean(list(dice.values()))) if dice else float("nan"),
                         "body_dice": res.body_dice, "metric_after": res.metric_after, "ncc_ratio": ratio[k],
                         "overlap": res.overlap, "seconds": res.seconds, "cached": res.cached, "flagged": flagged[k]})
        cal = calibrate(rows, cfg, args.good_fraction, args.gross_fraction)
        normal = [r for r in rows if not r["gross"]]
        cal["per_organ_dice"] = {o: _mean([r["dice"][o] for r in normal if o in r["dice"]]) for o in organs}
        cal["mean_label_dice"] = _mean([r["label_dice"] for r in normal])
        cal["seconds_per_pair"] = _mean([r["seconds"] for r in rows if not r["cached"]] or [r["seconds"] for r in rows])
        good = [r for r in rows if r["class"] == "good"]
        gross = [r for r in rows if r["class"] == "gross"]
        cal["good_pass_all_criteria"] = _frac([r["flagged"] is None for r in good])
        cal["gross_caught_any_criterion"] = _frac([r["flagged"] is not None for r in gross])
        cal["counts"] = {c: sum(r["class"] == c for r in rows) for c in ("good", "mediocre", "gross")}
        cal["rows"] = rows
        summary["methods"][method] = cal
        _print(method, cal)
    write_json(summary, args.out / "calibration.json")
    print(f"results: {args.out / 'calibration.json'}")
    return summary


def _print(method: str, cal: dict) -> None:
    print(f"\n{method}: median label Dice of the normal pairs {cal['median_normal_label_dice']:.3f}; "
          f"classes {cal['counts']}; {cal['seconds_per_pair']} s/pair")
    print(f"{'criterion':<15}{'thr':>6}{'good range':>16}{'mediocre':>16}{'gross range':>16}"
          f"{'good pass':>10}{'gross caught':>13}{'Dice flagged/passed':>21}{'p5 good (caught)':>18}")
    for field, t in cal["criteria"].items():
        rng = lambda v: "-" if v is None else f"{v[0]:.2f}-{v[1]:.2f}"  # noqa: E731
        print(f"{field:<15}{t['threshold']:>6.2f}{rng(t['good_range']):>16}{rng(t['mediocre_range']):>16}"
              f"{rng(t['gross_range']):>16}{str(t['good_pass']):>10}{str(t['gross_caught']):>13}"
              f"{str(t['label_dice_flagged']) + ' / ' + str(t['label_dice_passed']):>21}"
              f"{t['suggested']:>11} ({t['gross_caught_at_suggested']})")
    print(f"all criteria: good pairs passing {cal['good_pass_all_criteria']}, gross caught "
          f"{cal['gross_caught_any_criterion']}")
    print("per organ Dice (normal pairs): " + ", ".join(f"{o} {v}" for o, v in cal["per_organ_dice"].items()))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
