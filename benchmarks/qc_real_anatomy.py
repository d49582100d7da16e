"""Does pseudo-label QC reject real anatomy? OpenKBP's true labels put through QC as if they were pseudo-labels.

Per site, the ``k`` (default 2) most completely annotated of a spread pool of 'train' scans are the atlases
(as in ``benchmarks/label_efficiency.py``); ``--scans`` other labeled scans, spread over the sites, have
their *true* labels checked (confidence 1) against their site's atlases. Any flag there is a false one.
Then each scan is corrupted, one organ at a time (the organ shifted by ``--shift-mm`` along the x axis,
emptied, or grown by 4 voxels), and the fraction of corrupted organs QC flags is counted; and every organ
of a scan shifted at once (the scan must then be rejected). Rules compared:

* ``before``: ``volume_factor`` 1.5 on the atlases' volumes, no intensity check (the former default);
* ``after``: the current ``QCConfig()`` defaults (atlases widened by the measured prior, intensity check);
* ``after + federation``: also the federation's merged organ-volume range
  (:func:`fadal.plan.fingerprint.merge_fingerprints` of every site's fingerprint over its other
  labeled scans, :func:`fadal.amplify.qc.volume_ranges`).

    PYTHONPATH=src python benchmarks/qc_real_anatomy.py [--scans 50] [--out runs/qc_real_anatomy]

Prints the table and writes ``results.json`` (~1-2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids, spread, write_view  # noqa: E402


def corruptions(label: np.ndarray, c: int, shift_vox: int) -> dict[str, np.ndarray]:
    """One organ made clearly wrong three ways."""
    m = label == c
    out = {}
    moved = np.where(m, 0, label)
    moved[np.roll(m, shift_vox, axis=2)] = c
    out["shifted"] = moved
    out["empty"] = np.where(m, 0, label)
    grown = label.copy()
    grown[ndimage.binary_dilation(m, iterations=4) & (label == 0)] = c
    out["grown"] = grown
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/openkbp"))
    ap.add_argument("--out", type=Path, default=Path("runs/qc_real_anatomy"))
    ap.add_argument("--k", type=int, default=2, help="atlases per site")
    ap.add_argument("--scans", type=int, default=50)
    ap.add_argument("--shift-mm", type=float, default=30.0)
    ap.add_argument("--fingerprint-scans", type=int, default=15, help="labeled scans per site in its fingerprint")
    ap.add_argument("--try-max-hu", type=float, nargs="*", default=[], help="also try these max_hu_difference")
    args = ap.parse_args(argv)

    from fadal.amplify.qc import atlas_reference, check_pseudo_label, volume_ranges
    from fadal.config import QCConfig
    from fadal.data.io import write_json
    from fadal.data.site import load_site
    from fadal.plan.fingerprint import merge_fingerprints, site_fingerprint

    meta = json.loads((args.data / "cases.json").read_text())
    labels = {n: v for n, v in json.loads((args.data / "dataset.json").read_text())["labels"].items() if v}
    names = {v: n for n, v in labels.items()}
    img = lambda c: args.data / "imagesTr" / f"{c}_0000.nii.gz"  # noqa: E731
    lab = lambda c: args.data / "labelsTr" / f"{c}.nii.gz"  # noqa: E731
    sites = sorted({m["site"] for m in meta.values()})
    atlases, pools = {}, {}
    for s in sites:
        pool = site_case_ids(meta, s, "train")
        atlases[s] = sorted(spread(pool, 12), key=lambda c: (-len(meta[c]["annotated"]), pool.index(c)))[: args.k]
        pools[s] = [c for c in pool if c not in atlases[s]]
    per_site = int(np.ceil(args.scans / len(sites)))
    scans = [c for s in sites for c in spread(pools[s], per_site)][: args.scans]

    # The federation's organ-volume statistics: each site's fingerprint over other labeled scans, merged.
    with tempfile.TemporaryDirectory() as tmp:
        prints = []
        for s in sites:
            others = spread([c for c in pools[s] if c not in scans], args.fingerprint_scans)
            view = write_view(Path(tmp) / s, args.data, args.data, atlases[s] + others, [])
            prints.append(site_fingerprint(load_site(view)))
    federation = volume_ranges(merge_fingerprints(prints))

    rules = {"before": QCConfig(volume_factor=1.5), "after": QCConfig(),
             "after + federation": QCConfig(volume_ranges_ml=federation)}
    for hu in args.try_max_hu:
        rules[f"after, max_hu {hu:g}"] = QCConfig(max_hu_difference=hu)
    refs = {}
    for s in sites:
        ann = [{labels[o] for o in meta[a]["annotated"]} for a in atlases[s]]
        refs[s] = {"volume only": atlas_reference([lab(a) for a in atlases[s]], ann, labels.values()),
                   "with images": atlas_reference([lab(a) for a in atlases[s]], ann, labels.values(),
                                                  [img(a) for a in atlases[s]])}
    counts = {r: {"scans_rejected": 0, "organs_flagged": 0, "organs": 0, "flags": {}, "wrong_caught": {},
                  "all_shifted_rejected": 0} for r in rules}
    for case in scans:
        site = meta[case]["site"]
        image = sitk.ReadImage(str(img(case)))
        hu = sitk.GetArrayFromImage(image)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(case))))
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        drawn = [labels[o] for o in meta[case]["annotated"] if (truth == labels[o]).any()]
        fused = [c for c in drawn if refs[site]["volume only"][c].volumes_ml]  # organs the atlases can fuse
        conf = np.ones(truth.shape, np.float32)
        shift = int(round(args.shift_mm / image.GetSpacing()[0]))
        for rule, cfg in rules.items():
            ref, image_hu = (refs[site]["volume only"], None) if rule == "before" else (refs[site]["with images"], hu)
            cnt = counts[rule]
            res = check_pseudo_label(truth, conf, voxel_ml, fused, ref, names, cfg, image_hu=image_hu)
            cnt["scans_rejected"] += not res.accepted
            cnt["organs"] += len(fused)
            for o, info in res.organs.items():
                cnt["organs_flagged"] += bool(info["flags"])
                for f in info["flags"]:
                    cnt["flags"][f] = cnt["flags"].get(f, 0) + 1
                    cnt.setdefault("flagged_organs", {}).setdefault(f"{f}:{o}", []).append(
                        info.get("hu_difference") if f == "intensity" else info["volume_ml"])
            for c in fused:
                for kind, wrong in corruptions(truth, c, shift).items():
                    r = check_pseudo_label(wrong, conf, voxel_ml, fused, ref, names, cfg, image_hu=image_hu)
                    hit = cnt["wrong_caught"].setdefault(kind, [0, 0])
                    hit[0] += c not in r.kept or not r.accepted
                    hit[1] += 1
            shifted = np.zeros_like(truth)
            for c in fused:
                shifted[np.roll(truth == c, shift, axis=2)] = c
            cnt["all_shifted_rejected"] += not check_pseudo_label(shifted, conf, voxel_ml, fused, ref, names, cfg,
                                                                  image_hu=image_hu).accepted
    summary = {"scans": scans, "atlases": atlases, "federation_volume_ranges_ml": federation,
               "rules": {r: c.model_dump(mode="json") for r, c in rules.items()}, "counts": counts}
    write_json(summary, args.out / "results.json")
    n = len(scans)
    print(f"{n} real OpenKBP scans, true labels, {args.k} atlases per site; corruptions: organ shifted "
          f"{args.shift_mm:g} mm / emptied / grown 4 voxels")
    print(f"{'rule':<24}{'scans rejected':>15}{'organs flagged':>16}{'shifted caught':>16}{'empty caught':>14}"
          f"{'grown caught':>14}{'all shifted: scan rejected':>28}")
    for r, c in counts.items():
        w = {k: f"{v[0]}/{v[1]}" for k, v in c["wrong_caught"].items()}
        print(f"{r:<24}{c['scans_rejected']:>11}/{n:<3}{c['organs_flagged']:>10}/{c['organs']:<5}{w['shifted']:>16}"
              f"{w['empty']:>14}{w['grown']:>14}{c['all_shifted_rejected']:>24}/{n}   flags {c['flags']}")
    print(f"results: {args.out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
