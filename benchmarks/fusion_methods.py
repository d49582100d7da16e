"""Label fusion methods on OpenKBP: majority, STAPLE, locally weighted and joint label fusion, Dice per organ.

The pairs of ``benchmarks/registration_calibration.py`` (per site, ``--atlases`` atlases registered onto
``--targets`` other scans with the default elastix registration; the same cache, so after that benchmark
nothing is registered again): each target's warped atlases are fused by every method (each atlas votes
only on the organs it drew), and the fused label is scored against the target's real labels on the organs
the target drew and some atlas drew. Failed registrations are left out as amplification does.

    PYTHONPATH=src python benchmarks/fusion_methods.py [--out runs/registration_calibration]

Prints the table and writes ``fusion.json`` beside the registrations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration_calibration import _dice, pairs_for  # noqa: E402

METHODS = ("majority", "staple", "weighted", "joint")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/openkbp"))
    ap.add_argument("--out", type=Path, default=Path("runs/registration_calibration"))
    ap.add_argument("--sites", default="A,B,C")
    ap.add_argument("--atlases", type=int, default=3)
    ap.add_argument("--targets", type=int, default=6)
    ap.add_argument("--method", default="elastix", help="registration method whose cache is fused")
    args = ap.parse_args(argv)

    from fadal.amplify.fuse import fuse_files
    from fadal.amplify.register import register_many
    from fadal.amplify.result import registration_failures
    from fadal.config import FusionConfig, RegistrationConfig
    from fadal.data.io import write_json

    meta = json.loads((args.data / "cases.json").read_text())
    organs = {n: v for n, v in json.loads((args.data / "dataset.json").read_text())["labels"].items() if v}
    img = lambda c: args.data / "imagesTr" / f"{c}_0000.nii.gz"  # noqa: E731
    lab = lambda c: args.data / "labelsTr" / f"{c}.nii.gz"  # noqa: E731
    cfg = RegistrationConfig(method=args.method, workers=2)
    joint = FusionConfig().joint_options()
    rows = []
    for site in args.sites.split(","):
        atlases, targets = pairs_for(meta, site, args.atlases, args.targets)
        for target in targets:
            results = register_many([(img(target), img(a), lab(a)) for a in atlases], args.out / args.method, cfg,
                                    errors="record")
            keep = [i for i, why in enumerate(registration_failures(results, cfg)) if why is None]
            ref = sitk.ReadImage(str(img(target)))
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(target))))
            annotated = [{organs[o] for o in meta[atlases[i]]["annotated"]} for i in keep]
            scored = [o for o in organs if o in meta[target]["annotated"] and any(organs[o] in a for a in annotated)]
            row = {"site": site, "target": target, "atlases": [atlases[i] for i in keep], "dice": {}, "seconds": {}}
            for method in METHODS:
                t0 = time.perf_counter()
                fused, _ = fuse_files([results[i].warped_label for i in keep], ref, len(organs) + 1, annotated,
                                      method=method, image_paths=[results[i].warped_image for i in keep], joint=joint)
                row["seconds"][method] = round(time.perf_counter() - t0, 2)
                arr = sitk.GetArrayFromImage(fused)
                row["dice"][method] = {o: _dice(arr == organs[o], truth == organs[o]) for o in scored}
            rows.append(row)
            print(f"{target} ({len(keep)} atlases): " + ", ".join(
                f"{m} {np.mean(list(row['dice'][m].values())):.3f} ({row['seconds'][m]:.1f} s)" for m in METHODS),
                flush=True)
    per_organ = {m: {o: round(float(np.mean(v)), 4) for o in organs
                     if (v := [r["dice"][m][o] for r in rows if o in r["dice"][m]])} for m in METHODS}
    summary = {"settings": {"registration": args.method, "atlases": args.atlases, "targets": args.targets,
                            "sites": args.sites, "joint": joint},
               "per_organ_dice": per_organ,
               "mean_dice": {m: round(float(np.mean([d for r in rows for d in r["dice"][m].values()])), 4) for m in METHODS},
               "seconds_per_target": {m: round(float(np.mean([r["seconds"][m] for r in rows])), 2) for m in METHODS},
               "rows": rows}
    write_json(summary, args.out / "fusion.json")
    print(f"\n{len(rows)} targets, {args.atlases} atlases each ({args.method})")
    print(f"{'organ':<14}{'n':>4}" + "".join(f"{m:>10}" for m in METHODS))
    for o in per_organ["majority"]:
        n = sum(o in r["dice"]["majority"] for r in rows)
        print(f"{o:<14}{n:>4}" + "".join(f"{per_organ[m].get(o, float('nan')):>10.3f}" for m in METHODS))
    print(f"{'mean':<18}" + "".join(f"{summary['mean_dice'][m]:>10.3f}" for m in METHODS))
    print(f"{'s/target':<18}" + "".join(f"{summary['seconds_per_target'][m]:>10.2f}" for m in METHODS))
    print(f"results: {args.out / 'fusion.json'}")
    return summary


if __name__ == "__main__":
    main()
