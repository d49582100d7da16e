"""Amplifying one hospital: 2 atlases onto 50 unlabeled real CT scans, with `fadal amplify`'s defaults.

Issue target: a site of 50 unlabeled scans from 2 atlases in <= 10 minutes on 2 cores. The site is a
view of OpenKBP site A's official 'train' cases (symlinks, nothing copied): 2 labeled scans as atlases,
the next 50 without their labels. Reports wall time (registration, fusion + QC), accepted/rejected
scans with QC reasons, failed registrations, and the pseudo-labels' Dice against the real labels the
site was not given (organs both drew). A second run of the same command resumes: it should do nothing.

    python benchmarks/amplify_site.py [--unlabeled 50] [--atlases 2] [--out runs/bench_amplify_site]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids, spread, write_view  # noqa: E402
from label_efficiency import pseudo_label_dice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="OpenKBP folder (nnU-Net layout + cases.json)")
    ap.add_argument("--site", default="A")
    ap.add_argument("--atlases", type=int, default=2)
    ap.add_argument("--unlabeled", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_amplify_site")
    args = ap.parse_args(argv)

    from fadal.amplify.pipeline import amplify_site
    from fadal.config import AmplifyConfig
    from fadal.data.site import load_site

    data = args.data.resolve()
    meta = json.loads((data / "cases.json").read_text())
    cases = site_case_ids(meta, args.site, "train")
    if len(cases) < args.atlases + args.unlabeled:
        raise SystemExit(f"site {args.site} has {len(cases)} train cases, fewer than {args.atlases + args.unlabeled}")
    atlases = spread(cases, args.atlases)
    unlabeled = [c for c in cases if c not in atlases][: args.unlabeled]
    out = args.out.resolve()
    view = write_view(out / f"site_{args.site}", data, data, atlases, [], unlabeled)
    cfg = AmplifyConfig()
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(f"{stage}_first", time.perf_counter() - t0)
        marks[stage] = time.perf_counter() - t0
        if done == total or done % 10 == 0:
            print(f"  {stage}: {done}/{total} at {time.perf_counter() - t0:.0f} s", flush=True)

    summary = amplify_site(view, out / "amplified", cfg, progress=progress)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    again = amplify_site(view, out / "amplified", cfg)  # resume: every scan is done
    rerun = time.perf_counter() - t1
    site = load_site(view, name=args.site, validate=False)
    dice = pseudo_label_dice({args.site: out / "amplified"}, {args.site: site}, data)
    doc = {"site": args.site, "atlases": atlases, "unlabeled": len(unlabeled), "wall_s": round(wall, 1),
           "registration_s": round(marks.get("register", 0.0), 1),
           "fusion_qc_s": round(wall - marks.get("register", 0.0), 1), "rerun_s": round(rerun, 1),
           "rerun_registrations": again.n_registrations_this_run, "accepted": summary.n_accepted,
           "rejected": [r.model_dump() for r in summary.rejected],
           "failed_registrations": summary.n_failed_registrations_this_run,
           "registrations": summary.n_registrations_this_run, "pseudo_label_dice": dice,
           "mean_confidence": summary.mean_confidence, "registration_config": cfg.registration.model_dump(mode="json")}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"\n{len(unlabeled)} unlabeled scans from {len(atlases)} atlases (OpenKBP site {args.site})")
    print(f"{'wall':>8}{'register':>10}{'fuse+QC':>9}{'accepted':>10}{'rejected':>10}{'failed reg':>12}{'re-run':>8}")
    print(f"{wall:7.0f}s{doc['registration_s']:9.0f}s{doc['fusion_qc_s']:8.0f}s{doc['accepted']:10d}"
          f"{len(doc['rejected']):10d}{doc['failed_registrations']:12d}{rerun:7.1f}s")
    print("pseudo-label Dice vs the withheld labels: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if v is not None))
    for r in summary.rejected:
        print(f"  rejected {r.case}: {'; '.join(r.reasons)}")
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
