"""Federated learning on real multi-institution CT: OpenKBP head-and-neck organs at risk, sites A/B/C.

Compares, on each site's official validation cases (per-site, per-organ Dice):

* ``local-<site>``: each site alone, as many optimiser steps as it takes in a federation;
* ``centralised``: all sites' training cases pooled (the upper reference; impossible in practice), as many
  steps as all sites together take in a federation (equal total optimiser steps);
* ``fedavg``, ``fedprox``, ``fedbn``: Flower federations (marginal partial-label loss);
* ``cyclic``: cyclic weight transfer, one site per round in turn (sites x rounds rounds: the same total steps);
* ``condist``: FedAvg + ConDistFL conditional distillation for the organs a case did not draw;
* ``loso-<site>``: FedAvg over the other sites only, scored on the site it never saw (leave one site out:
  does the model hold on another institution's scanner?).

Every variant uses one plan, made by the planner from the three sites' merged fingerprints for
``plan_minutes`` per ``rounds x local_steps`` steps, and the one training engine.

OpenKBP sites annotate different organ subsets (cases.json ``annotated``): partial labels are real here.
Per-site views of the one OpenKBP folder are built with symlinks (nothing is copied); ``split``
in each view's cases.json is the official split.

Timing: wall seconds per variant; for federations also the seconds spent inside local training
(``fadal.model.engine.fit``), inside the ClientApp (training + data loading + (de)serialising the model),
and the rest, which is Flower (Ray start, messaging, aggregation) plus checkpointing.

    python benchmarks/federation.py                      # default (DEFAULT): not yet measured on the new engine
    python benchmarks/federation.py --quick              # < 3 min smoke run
    python benchmarks/federation.py --train-data ../shared/data/openkbp --out runs/bench_federation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids, spread, with_overrides, write_view  # noqa: E402  (shared with label_efficiency.py)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp"


@dataclass
class Settings:
    train_per_site: int = 10          # training cases per site (official 'train' split), evenly spread
    eval_per_site: int = 6            # validation cases per site (official 'validation' split)
    rounds: int = 10
    local_steps: int = 20             # optimiser steps per site and round
    plan_minutes: float = 6.0         # the plan's patch is sized so rounds x local_steps steps take about this
    spacing_mm: float | None = None   # None: the planner's spacing
    channels: tuple[int, ...] | None = None  # None: the planner's network
    lr: float = 2e-3
    proximal_mu: float = 0.01
    server_lr: float = 1.0            # FedAvgM server step on the averaged update (every federated variant)
    server_momentum: float = 0.0
    distill_weight: float = 1.0
    threads: int = 0                  # torch threads (0 = torch's default: every core)
    variants: tuple[str, ...] = ("local", "centralised", "fedavg", "fedprox", "cyclic", "fedbn", "condist", "loso")
    sites: tuple[str, ...] = ("A", "B", "C")
    seed: int = 0


DEFAULT = Settings()
QUICK = Settings(train_per_site=2, eval_per_site=1, rounds=2, local_steps=2, plan_minutes=0.1, spacing_mm=10.0,
                 channels=(4, 8, 16))


@dataclass
class VariantResult:
    name: str
    seconds: float
    dice: dict = field(default_factory=dict)  # site -> {organ: dice, "mean": ...}
    timing: dict = field(default_factory=dict)


def build_site_views(train_data: Path, eval_data: Path, dest: Path, settings: Settings) -> dict[str, Path]:
    """One nnU-Net folder per OpenKBP site: imagesTr/labelsTr = training cases, imagesTs/labelsTs =
    validation cases, all symlinks into the original folders; cases.json keeps 'annotated'."""
    views: dict[str, Path] = {}
    train_meta = json.loads((train_data / "cases.json").read_text())
    eval_meta = json.loads((eval_data / "cases.json").read_text())
    for site in settings.sites:
        train_ids = spread(site_case_ids(train_meta, site, "train"), settings.train_per_site)
        eval_ids = spread(site_case_ids(eval_meta, site, "validation"), settings.eval_per_site)
        if not train_ids or not eval_ids:
            raise SystemExit(f"site {site}: no train ({len(train_ids)}) or validation ({len(eval_ids)}) cases in cases.json")
        views[site] = write_view(dest / f"site_{site}", train_data, eval_data, train_ids, eval_ids)
    return views


def dice_on_cases(model, site, plan) -> dict:
    """Mean Dice per drawn organ over ``site.test``, each prediction on its case's own grid
    (Dice only: HD95/surface Dice are what `fadal evaluate` adds, and cost more than the prediction)."""
    import numpy as np
    import SimpleITK as sitk

    from fadal.data.site import load_pair
    from fadal.model.infer import predict_image
    from fadal.model.net import pick_device

    per_organ: dict[str, list[float]] = {}
    for case in site.test:
        image, ref = load_pair(site, case)
        pred, _ = predict_image(model, image, plan, pick_device())
        p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
        for organ in case.annotated:
            v = site.labels[organ]
            a, b = p == v, r == v
            denom = int(a.sum()) + int(b.sum())
            if denom:
                per_organ.setdefault(organ, []).append(2.0 * int(np.logical_and(a, b).sum()) / denom)
    out = {o: round(float(np.mean(v)), 4) for o, v in per_organ.items()}
    out["mean"] = round(float(np.mean(list(out.values()))), 4) if out else None
    return out


def evaluate_sites(model, views: dict[str, Path], plan, sites=None, norm_cache: dict[str, Path] | None = None) -> dict:
    """Per-site, per-organ mean Dice on the site's validation cases."""
    from fadal.data.site import load_site
    from fadal.federated.site_task import SiteRuntime, restore_local_norm

    out = {}
    for name in sites or views:
        site = load_site(views[name], name=name, validate=False)
        if norm_cache is not None:  # FedBN: the site's own normalisation layers
            if not restore_local_norm(model, SiteRuntime(name, views[name], None, False, norm_cache[name])):
                raise RuntimeError(f"site {name}: no FedBN normalisation layers in {norm_cache[name]}")
        out[name] = dice_on_cases(model, site, plan)
    return out


def planner_config(settings: Settings):
    from fadal.config import PlannerConfig

    return PlannerConfig(budget_minutes=settings.plan_minutes, min_steps=settings.rounds * settings.local_steps,
                         spacing_mm=(settings.spacing_mm,) * 3 if settings.spacing_mm else None,
                         channels=settings.channels)


def federation_config(settings: Settings, views: dict[str, Path], out: Path, plan=None, **fed):
    """The federation every federated variant runs (``fed``: strategy and partial-label options);
    ``benchmarks/deployment.py`` runs the same one. ``plan`` None: planned from the sites' fingerprints."""
    from fadal.config import FederationConfig, SiteSpec, TrainConfig

    train_cfg = TrainConfig(lr=settings.lr, seed=settings.seed, num_threads=settings.threads)
    rounds = fed.pop("rounds", settings.rounds)
    return FederationConfig(sites=[SiteSpec(name=f"site_{s}", data=p) for s, p in views.items()],
                            rounds=rounds, local_steps=settings.local_steps, train=train_cfg, plan=plan,
                            planner=planner_config(settings), evaluate_every=0, out=out,
                            proximal_mu=settings.proximal_mu, distill_weight=settings.distill_weight,
                            **{"server_lr": settings.server_lr, "server_momentum": settings.server_momentum, **fed})


def run(settings: Settings, train_data: Path, eval_data: Path, out: Path, log=print) -> dict:
    import torch

    from fadal.data.site import load_site
    from fadal.model.infer import load_checkpoint
    from fadal.model.centralised import train_centralised
    from fadal.plan.planner import plan_for_sites

    if settings.threads:
        torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    views = build_site_views(train_data, eval_data, out / "sites", settings)
    plan = plan_for_sites([load_site(v, name=f"site_{s}", validate=False) for s, v in views.items()],
                          planner_config(settings))
    log(f"plan: spacing {plan.preprocess.spacing_mm} mm, patch {plan.patch_size} x {plan.batch_size}, "
        f"{plan.network.architecture} {plan.network.channels}")
    base = federation_config(settings, views, out, plan)
    train_cfg, specs = base.train, base.sites
    site_steps = settings.rounds * settings.local_steps  # what one site takes in a federation
    results: list[VariantResult] = []

    def centralised(name: str, site_specs, eval_sites):
        t0 = time.perf_counter()
        ckpt = train_centralised(site_specs, out / name, train_cfg, plan, steps=site_steps * len(site_specs))
        t_train = time.perf_counter() - t0
        model, _, _, _ = load_checkpoint(ckpt)
        dice = evaluate_sites(model, views, plan, eval_sites)
        hist = json.loads((out / name / "history.json").read_text())
        return VariantResult(name, time.perf_counter() - t0, dice,
                             {"train_wall_s": round(t_train, 1), "train_s": round(hist["train_seconds"], 1),
                              "steps": hist["steps"]})

    def federated(name: str, on=None, score=None, **fed):
        from fadal.federated.simulation import simulate

        members = {s: v for s, v in views.items() if on is None or s in on}
        cfg = federation_config(settings, members, out / name, plan, **fed)
        t0 = time.perf_counter()
        history = simulate(cfg)
        t_fed = time.perf_counter() - t0
        model, _, _, _ = load_checkpoint(out / name / "global_model.pt")
        caches = {s: out / name / "cache" / f"site_{s}" for s in views} if cfg.strategy == "fedbn" else None
        dice = evaluate_sites(model, views, plan, score, norm_cache=caches)
        rounds = [r for r in history.rounds if r.loss is not None]  # fadal.records.RoundEntry
        train_s = sum(r.train_seconds_sum or 0.0 for r in rounds)
        client_s = sum(r.client_seconds_sum or 0.0 for r in rounds)
        rounds_s = sum(r.seconds or 0.0 for r in rounds)
        timing = {
            "federation_wall_s": round(t_fed, 1), "rounds_s": round(rounds_s, 1), "train_s": round(train_s, 1),
            "client_s": round(client_s, 1), "flower_and_server_s": round(t_fed - client_s, 1),
            "flower_share": round((t_fed - client_s) / t_fed, 3) if t_fed else None,
            "bytes_up": sum(r.bytes_up or 0 for r in rounds), "bytes_down": sum(r.bytes_down or 0 for r in rounds),
            "loss_per_round": [round(r.loss, 4) for r in rounds],
        }
        return VariantResult(name, time.perf_counter() - t0, dice, timing)

    for variant in settings.variants:
        log(f"--- {variant}")
        if variant == "local":
            for s, spec in zip(views, specs):
                results.append(centralised(f"local-{s}", [spec], [s]))
                log(f"    local-{s}: {results[-1].seconds:.0f} s")
        elif variant == "centralised":
            results.append(centralised("centralised", specs, None))
        elif variant == "fedavg":
            results.append(federated("fedavg", strategy="fedavg"))
        elif variant == "fedprox":
            results.append(federated("fedprox", strategy="fedprox"))
        elif variant == "cyclic":  # one site per round: sites x rounds rounds for the same total steps
            results.append(federated("cyclic", strategy="cyclic", rounds=settings.rounds * len(views),
                                     server_lr=1.0, server_momentum=0.0))
        elif variant == "fedbn":
            results.append(federated("fedbn", strategy="fedbn"))
        elif variant == "condist":
            results.append(federated("condist", strategy="fedavg", partial_label_mode="condist"))
        elif variant == "loso":
            for held_out in views:
                others = [s for s in views if s != held_out]
                results.append(federated(f"loso-{held_out}", on=others, score=[held_out], strategy="fedavg"))
                log(f"    loso-{held_out}: {results[-1].seconds:.0f} s")
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        log(f"    {results[-1].name}: {results[-1].seconds:.0f} s")

    doc = {"settings": asdict(settings), "train_data": str(train_data), "eval_data": str(eval_data),
           "sites": {s: {"train": sorted(p.name[:-len("_0000.nii.gz")] for p in (v / "imagesTr").iterdir()),
                         "validation": sorted(p.name[:-len("_0000.nii.gz")] for p in (v / "imagesTs").iterdir())}
                     for s, v in views.items()},
           "torch_threads": torch.get_num_threads(),
           "variants": {r.name: {"seconds": round(r.seconds, 1), "dice": r.dice, "timing": r.timing} for r in results}}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def print_tables(doc: dict, log=print) -> None:
    variants = doc["variants"]
    sites = list(doc["sites"])
    organs: list[str] = []
    for v in variants.values():
        for per_site in v["dice"].values():
            organs += [o for o in per_site if o not in organs and o != "mean"]
    log("\nMean Dice per site (validation cases; organs scored where drawn)")
    log(f"{'variant':<14}" + "".join(f"{s:>9}" for s in sites) + f"{'all':>9}{'wall s':>9}")
    for name, v in variants.items():
        vals = [v["dice"].get(s, {}).get("mean") for s in sites]
        shown = [f"{x:9.3f}" if x is not None else f"{'-':>9}" for x in vals]
        have = [x for x in vals if x is not None]
        log(f"{name:<14}" + "".join(shown) + (f"{sum(have) / len(have):9.3f}" if have else f"{'-':>9}") + f"{v['seconds']:9.0f}")
    log("\nDice per organ (mean over the sites that scored it)")
    log(f"{'variant':<14}" + "".join(f"{o[:10]:>11}" for o in organs))
    for name, v in variants.items():
        row = []
        for o in organs:
            vals = [d[o] for d in v["dice"].values() if d.get(o) is not None]
            row.append(f"{sum(vals) / len(vals):11.3f}" if vals else f"{'-':>11}")
        log(f"{name:<14}" + "".join(row))
    log("\nTime (s): federation wall = ClientApp time (training + loading) + Flower/server")
    log(f"{'variant':<14}{'wall':>8}{'train':>8}{'client':>8}{'flower':>8}{'share':>7}{'MB up':>8}{'MB down':>9}")
    for name, v in variants.items():
        t = v["timing"]
        if "federation_wall_s" in t:
            log(f"{name:<14}{t['federation_wall_s']:8.0f}{t['train_s']:8.0f}{t['client_s']:8.0f}"
                f"{t['flower_and_server_s']:8.0f}{t['flower_share']:7.2f}{t['bytes_up'] / 1e6:8.1f}{t['bytes_down'] / 1e6:9.1f}")
        else:
            log(f"{name:<14}{t.get('train_wall_s', 0):8.0f}{t.get('train_s', 0):8.0f}{'-':>8}{'-':>8}{'-':>7}{'-':>8}{'-':>9}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-data", type=Path, default=DEFAULT_DATA, help="OpenKBP folder (official_split 'train' cases)")
    ap.add_argument("--eval-data", type=Path, default=None, help="folder with the 'validation' cases (default: --train-data)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_federation")  # runs/ is git-ignored
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 3 min)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--train-per-site", type=int, default=None)
    ap.add_argument("--eval-per-site", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (0 = all cores)")
    ap.add_argument("--seed", type=int, default=None, help="training seed (every variant)")
    ap.add_argument("--server-lr", type=float, default=None, help="FedAvgM server learning rate (1 = FedAvg)")
    ap.add_argument("--server-momentum", type=float, default=None, help="FedAvgM server momentum")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(DEFAULT.variants))
    args = ap.parse_args(argv)
    settings = with_overrides(QUICK if args.quick else DEFAULT, args,
                              ("rounds", "train_per_site", "eval_per_site", "threads", "server_lr", "server_momentum", "seed"), {"variants": str})
    if not (args.train_data / "cases.json").exists():
        print(f"{args.train_data}: no cases.json (OpenKBP folder expected)", file=sys.stderr)
        return 2
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    import tempfile

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="fadal_ray_"))  # short socket paths
    t0 = time.perf_counter()
    doc = run(settings, args.train_data.resolve(), (args.eval_data or args.train_data).resolve(), args.out.resolve())
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print_tables(doc)
    print(f"\ntotal {doc['total_seconds']:.0f} s; results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
