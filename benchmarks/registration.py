"""Atlas propagation on OpenKBP: elastix (register_atlas, default settings) against its initial translation.

Atlases are propagated between held-out pairs of one site's *validation* split (atlas i -> target
i+1, disjoint pairs). Dice is scored per organ only on organs annotated in both the atlas and the
target (OpenKBP annotations are partial: an organ a case did not contour is unknown there, not
background). "translation" is the initial translation alone (elastix's start), to show what the
deformable stage adds.

    PYTHONPATH=src python benchmarks/registration.py [--quick] [--data ../shared/data/openkbp] [--out runs/...]

Writes ``results.json`` (per pair and per organ, timings, settings) to ``--out`` and prints a table.
Registrations are cached by content under ``--out``: a re-run only redoes what changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids  # noqa: E402


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / n if n else float("nan")


def _organ_dice(pred: Path | sitk.Image, truth: Path, organs: dict[str, int]) -> dict[str, float]:
    p = sitk.GetArrayFromImage(pred if isinstance(pred, sitk.Image) else sitk.ReadImage(str(pred)))
    t = sitk.GetArrayFromImage(sitk.ReadImage(str(truth)))
    return {name: _dice(p == v, t == v) for name, v in organs.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/openkbp"))
    ap.add_argument("--out", type=Path, default=Path("runs/registration_benchmark"))
    ap.add_argument("--site", default="A")
    ap.add_argument("--pairs", type=int, default=4, help="held-out (atlas, target) pairs")
    ap.add_argument("--threads", type=int, default=1, help="ITK threads")
    ap.add_argument("--quick", action="store_true", help="2 pairs (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = 2

    import itk

    from fadal.amplify.elastix import RegistrationFailed
    from fadal.amplify.register import register_atlas
    from fadal.amplify.result import registration_failure
    from fadal.config import RegistrationConfig

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    meta = json.loads((args.data / "cases.json").read_text())
    organs = {n: v for n, v in json.loads((args.data / "dataset.json").read_text())["labels"].items() if v}
    img = lambda c: args.data / "imagesTr" / f"{c}_0000.nii.gz"  # noqa: E731
    lab = lambda c: args.data / "labelsTr" / f"{c}.nii.gz"  # noqa: E731
    held = site_case_ids(meta, args.site, "validation")
    pairs = [(held[2 * k], held[2 * k + 1]) for k in range(min(args.pairs, len(held) // 2))]
    if not pairs:
        raise SystemExit(f"site {args.site}: no validation pairs in {args.data / 'cases.json'}")

    elastix_cfg = RegistrationConfig(workers=1)
    args.out.mkdir(parents=True, exist_ok=True)

    rows, failed = [], []
    for atlas, target in pairs:
        both = sorted(set(meta[atlas]["annotated"]) & set(meta[target]["annotated"]), key=organs.get)
        scored = {n: organs[n] for n in both}
        row: dict = {"atlas": atlas, "target": target, "organs": both}
        try:
            res = register_atlas(img(target), img(atlas), lab(atlas), args.out / "elastix", elastix_cfg)
        except RegistrationFailed as e:  # elastix gave up: the pipeline leaves such an atlas out; so do we
            print(f"{atlas} -> {target}: elastix failed ({e})", flush=True)
            failed.append({"atlas": atlas, "target": target, "error": str(e)})
            continue
        row["elastix"] = {"dice": _organ_dice(res.warped_label, lab(target), scored), "seconds": res.seconds,
                          "cached": res.cached, "ncc": res.metric_after, "body_dice": res.body_dice,
                          "failed": registration_failure(res, elastix_cfg)}
        fixed = sitk.ReadImage(str(img(target)))
        moved = sitk.Resample(sitk.ReadImage(str(lab(atlas))), fixed,
                              sitk.TranslationTransform(3, list(res.init_translation_mm)),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        row["translation"] = {"dice": _organ_dice(moved, lab(target), scored), "ncc": res.metric_init}
        print(f"{atlas} -> {target}: " + ", ".join(
            f"{m} {np.nanmean(list(row[m]['dice'].values())):.3f}" for m in ("translation", "elastix"))
            + f" | s/pair elastix {row['elastix']['seconds']:.1f}", flush=True)
        rows.append(row)

    methods = ("translation", "elastix")
    per_organ = {m: {o: float(np.nanmean([r[m]["dice"][o] for r in rows if o in r[m]["dice"]]))
                     for o in organs if any(o in r[m]["dice"] for r in rows)} for m in methods}
    summary = {
        "site": args.site, "pairs": [[a, t] for a, t in pairs], "threads": args.threads,
        "mean_dice": {m: float(np.nanmean([d for r in rows for d in r[m]["dice"].values()])) for m in methods},
        "per_organ_dice": per_organ,
        "seconds_per_pair": {"elastix": float(np.mean([r["elastix"]["seconds"] for r in rows]))},
        "settings": {"elastix": elastix_cfg.model_dump(mode="json")},
        "rows": rows, "elastix_errors": failed,
    }
    from fadal.data.io import write_json

    write_json(summary, args.out / "results.json")

    print(f"\nsite {args.site}: {len(pairs)} held-out pairs ({args.threads} ITK thread(s)); "
          f"{len(failed)} where elastix gave up, left out below")
    print(f"{'organ':<14}{'n':>3}" + "".join(f"{m:>13}" for m in methods))
    for o in per_organ["elastix"]:
        n = sum(o in r["elastix"]["dice"] for r in rows)
        print(f"{o:<14}{n:>3}" + "".join(f"{per_organ[m].get(o, float('nan')):>13.3f}" for m in methods))
    print(f"{'mean (all)':<17}" + "".join(f"{summary['mean_dice'][m]:>13.3f}" for m in methods))
    print(f"{'s/pair':<17}{'':>13}" + f"{summary['seconds_per_pair']['elastix']:>13.2f}")
    print(f"results: {args.out / 'results.json'}")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
