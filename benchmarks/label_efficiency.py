"""Label efficiency on real CT: "I can annotate two scans; how close does FADAL get me to having
annotated all of them?" OpenKBP head-and-neck organs at risk, sites A/B/C.

Per site, a pool of training scans (official 'train' split): k of them labeled (k = 1, 2, 4; the
scans with the most complete annotations, nested: the k = 1 scan is among the k = 2 ones), the
others unlabeled. Variants, each cumulative on the one before:

* ``supervised``: the k labeled scans per site only;
* ``fusion``:     + multi-atlas pseudo-labels of the unlabeled scans (fadal.amplify.amplify_site);
* ``synthesis``:  + synthetic pairs from learned transforms (fadal.amplify.synthesize);
* ``selftrain``:  + self-training: the ``synthesis`` network refines the pseudo-labels, retrain
  (fadal.amplify.selftrain);
* ``full``:       upper bound: every scan of the pool labeled (its real, partial, annotations).

Training is centralised by default (the sites' data pooled), every run the same number of optimiser
steps. ``--federated STRATEGY`` (``cyclic``, ``fedavg``, ``fedprox``) trains every variant as a Flower
federation instead, amplification inside it as the product does it (``fl.yaml``): each site's
``amplified`` folder (``fusion``), ``synthesis:`` drawn at the site from its cached transforms
(``synthesis``), and ``selftrain_every`` half the run (``selftrain``: each site refines its pseudo-labels
once with the global model it received). The federation takes ``steps`` optimiser steps in all
(``rounds`` rounds per site); ``full`` is then the *pooled* full-label run (the reference a fraction is
taken of) and ``full/federated`` the federation with every scan labeled. Scores on the official 'validation'
cases of each site, in each case's own geometry: per-organ Dice and HD95 (organs scored where drawn),
and the fraction of the full-label Dice each variant recovers. Pseudo-label quality (Dice of the
fused and refined labels against the real labels of the "unlabeled" scans) is reported as well.

    python benchmarks/label_efficiency.py                  # default (pooled): not re-run on the new engine
    python benchmarks/label_efficiency.py --quick          # < 4 min smoke run (add --federated cyclic: ~2 min)
    python benchmarks/label_efficiency.py --train-data ../shared/data/openkbp --out runs/bench_label_efficiency
    python benchmarks/label_efficiency.py --federated cyclic --variants supervised,selftrain               # 52 min
    python benchmarks/label_efficiency.py --federated cyclic --variants supervised,selftrain --steps 1800 --plan-minutes 15

Measured on this 2-core machine, idle (2026-12-03), federated (cyclic) runs of supervised + selftrain for
k = 1, 2, 4 plus the two full-label runs (8 trainings): 3106 s at 600 steps (training 1765 s, 141-344 s a run;
registration + fusion 428 s; synthesis 186 s; 144 validation predictions with Dice/HD95 723 s); 4732 s at 1800
steps with the registrations and transforms already cached (training 3971 s, 409-702 s a run; a cold run adds
~10 min). At 600 steps the full-label bound misses the organs few scans draw (README): use 1800.
``timing`` in results.json records what each stage really took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import site_case_ids, spread, with_overrides, write_view  # noqa: E402  (shared with federation.py)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp"
VARIANTS = ("supervised", "fusion", "synthesis", "selftrain")


@dataclass
class Settings:
    ks: tuple[int, ...] = (1, 2, 4)       # labeled scans per site
    unlabeled_per_site: int = 8           # unlabeled scans per site (the same ones for every k)
    eval_per_site: int = 6                # validation cases per site (official 'validation' split)
    sites: tuple[str, ...] = ("A", "B", "C")
    spacing_mm: float | None = None       # None: the planner's spacing (the sites' median)
    plan_minutes: float = 5.0             # the plan (patch size) is sized for runs of `steps` in this budget
    crop_to_body: bool = True             # PreprocessConfig.crop_to_body: the network sees the body's box only
    channels: tuple[int, ...] | None = None  # None: the planner's network
    steps: int = 600                      # optimiser steps per training run, same for every variant
    lr: float = 2e-3
    confidence_threshold: float = 0.7     # fused voxels below this are ignored by the loss
    amplified_weight: float = 1.0         # TrainConfig.amplified_weight: patches of a pseudo-labeled scan vs a real one
    # Atlas registration of `fadal amplify` (native grid): few iterations, shared cache across k.
    registration: dict = field(default_factory=lambda: dict(
        resolutions=2, affine_iterations=64, bspline_iterations=64, spatial_samples=1024, grid_spacing_mm=30.0,
        workers=2))
    # Synthesis: registration on the 6 mm grid (SynthesisConfig's defaults) and share of synthetic pairs.
    synthesis: dict = field(default_factory=lambda: dict(fraction=0.5))
    selftrain: dict = field(default_factory=lambda: dict(rounds=1, model_confidence=0.9))
    variants: tuple[str, ...] = VARIANTS
    full_label: bool = True
    threads: int = 0                      # torch and ITK threads (0 = the libraries' defaults: every core)
    seed: int = 0
    federated: str | None = None          # None: pooled training; else the Flower strategy every run uses
    rounds: int = 10                      # federated: rounds per site (cyclic: sites x this many rounds)


DEFAULT = Settings()
QUICK = Settings(
    ks=(1,), unlabeled_per_site=2, eval_per_site=1, spacing_mm=10.0, channels=(4, 8, 16), steps=10, plan_minutes=0.2, rounds=2,
    registration=dict(resolutions=1, affine_iterations=32, bspline_iterations=24, spatial_samples=512,
                      grid_spacing_mm=40.0, workers=1),
    synthesis=dict(fraction=0.5, registration=dict(resolutions=1, affine_iterations=32, bspline_iterations=24,
                                                   spatial_samples=512, grid_spacing_mm=40.0, workers=1)),
)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def choose_cases(train_meta: dict, eval_meta: dict, settings: Settings) -> dict[str, dict[str, list[str]]]:
    """Per site: 'atlases' (labeled order, most complete annotations first), 'unlabeled', 'validation'."""
    kmax = max(settings.ks)
    plan = {}
    for site in settings.sites:
        train_ids = site_case_ids(train_meta, site, "train")
        eval_ids = spread(site_case_ids(eval_meta, site, "validation"), settings.eval_per_site)
        pool = spread(train_ids, kmax + settings.unlabeled_per_site)
        if len(pool) < kmax + 1 or not eval_ids:
            raise SystemExit(f"site {site}: {len(pool)} train / {len(eval_ids)} validation cases; need > {kmax} and >= 1")
        # A hospital that annotates k scans draws every organ it can: take the most complete ones.
        atlases = sorted(pool, key=lambda c: (-len(train_meta[c]["annotated"]), pool.index(c)))[:kmax]
        plan[site] = {"atlases": atlases, "unlabeled": [c for c in pool if c not in atlases],
                      "validation": eval_ids}
    return plan


def build_views(plan: dict, train_data: Path, eval_data: Path, dest: Path, settings: Settings) -> dict[str, dict[str, Path]]:
    """views['k<k>'][site] = k labeled + unlabeled scans; views['full'][site] = all of them labeled."""
    views: dict[str, dict[str, Path]] = {}
    for k in settings.ks:
        views[f"k{k}"] = {s: write_view(dest / f"k{k}" / f"site_{s}", train_data, eval_data, p["atlases"][:k],
                                        p["validation"], p["unlabeled"]) for s, p in plan.items()}
    if settings.full_label:
        views["full"] = {s: write_view(dest / "full" / f"site_{s}", train_data, eval_data,
                                       p["atlases"] + p["unlabeled"], p["validation"]) for s, p in plan.items()}
    return views


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------

def evaluate(model, sites: dict, plan) -> dict:
    """Dice/HD95/surface Dice per organ, pooled over every site's validation cases, and per site."""
    from fadal.evaluate.evaluate import evaluate_model_on_cases
    from fadal.evaluate.metrics import summarize
    from fadal.model.net import pick_device

    per_case, per_site = {}, {}
    for name, site in sites.items():
        res = evaluate_model_on_cases(model, site, site.test, plan, pick_device())
        per_case.update(res["per_case"])
        per_site[name] = res["summary"]
    return {"summary": summarize(per_case), "per_site": per_site, "per_case": per_case}


def pseudo_label_dice(label_dirs: dict[str, Path], sites: dict, train_data: Path) -> dict:
    """Mean Dice per organ of pseudo-labels against the real labels of the 'unlabeled' scans, over the
    organs both drew (kept voxels only where a confidence map says a voxel is dropped)."""
    import numpy as np
    import SimpleITK as sitk

    from fadal.model.patches import read_provenance

    meta = json.loads((train_data / "cases.json").read_text())
    scores: dict[str, list[float]] = {}
    for name, site in sites.items():
        d = label_dirs.get(name)
        if d is None:
            continue
        for case in site.unlabeled:
            lab, prov = d / "labels" / f"{case.case_id}.nii.gz", d / "provenance" / f"{case.case_id}.json"
            if not (lab.exists() and prov.exists()):
                continue
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(train_data / "labelsTr" / f"{case.case_id}.nii.gz")))
            known = set(read_provenance(prov).organs_fused)
            for organ in meta[case.case_id]["annotated"]:
                if organ not in known:
                    continue
                v = site.labels[organ]
                a, b = pred == v, ref == v
                if b.any():
                    scores.setdefault(organ, []).append(2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum()))
    out = {o: round(float(np.mean(v)), 4) for o, v in scores.items()}
    out["mean"] = round(float(np.mean(list(out.values()))), 4) if out else None
    return out


def recovery(runs: dict) -> dict:
    """Per run: Dice / full-label Dice, per organ and for the organ mean."""
    full = runs.get("full", {}).get("summary")
    if not full:
        return {}
    out = {}
    for name, run in runs.items():
        if name == "full":
            continue
        row = {}
        for organ, ref in full.items():
            d = run["summary"].get(organ, {}).get("dice")
            if d is not None and ref.get("dice"):
                row[organ] = round(d / ref["dice"], 4)
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------

def run(settings: Settings, train_data: Path, eval_data: Path, out: Path, log=print) -> dict:
    import torch

    from fadal.amplify.pipeline import amplify_site
    from fadal.amplify.selftrain import SelfTrainSite, selftrain
    from fadal.amplify.synthesize import site_synthesizer
    from fadal.config import (AmplifyConfig, PlannerConfig, RegistrationConfig, SelfTrainConfig, SynthesisConfig,
                              TrainConfig)
    from fadal.errors import FadalInputError
    from fadal.data.site import load_site
    from fadal.model.engine import train_model
    from fadal.model.patches import site_training_items
    from fadal.plan.planner import plan_for_sites

    t_start = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(settings.threads or os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    train_meta = json.loads((train_data / "cases.json").read_text())
    eval_meta = json.loads((eval_data / "cases.json").read_text())
    cases = choose_cases(train_meta, eval_meta, settings)
    views = build_views(cases, train_data, eval_data, out / "views", settings)
    # One plan for every run: from the full-label pool's fingerprints (what the sites hold), sized so that
    # `steps` steps fit `plan_minutes`.
    first = next(iter(views.values()))
    pool = [load_site(v, name=f"site_{s}", validate=False) for s, v in views.get("full", first).items()]
    net_plan = plan_for_sites(pool, PlannerConfig(
        budget_minutes=settings.plan_minutes, min_steps=settings.steps, crop_to_body=settings.crop_to_body,
        spacing_mm=(settings.spacing_mm,) * 3 if settings.spacing_mm else None, channels=settings.channels))
    pre = net_plan.preprocess
    log(f"plan: spacing {pre.spacing_mm} mm, HU {pre.hu_window}, patch {net_plan.patch_size} x {net_plan.batch_size}, "
        f"{net_plan.network.architecture} {net_plan.network.channels}")
    train_cfg = TrainConfig(lr=settings.lr, seed=settings.seed, num_threads=settings.threads,
                            confidence_threshold=settings.confidence_threshold, amplified_weight=settings.amplified_weight)
    reg_cfg = RegistrationConfig(**settings.registration, seed=settings.seed)
    syn_kw = dict(settings.synthesis)
    if "registration" in syn_kw:
        syn_kw["registration"] = RegistrationConfig(**syn_kw["registration"])
    syn_cfg = SynthesisConfig(**syn_kw, seed=settings.seed)
    st_cfg = SelfTrainConfig(**settings.selftrain)
    timing: dict[str, float] = {"views_s": round(time.perf_counter() - t_start, 1)}
    runs: dict[str, dict] = {}
    pseudo: dict[str, dict] = {}
    amplification: dict[str, dict] = {}

    def add_time(key: str, t0: float) -> float:
        dt = time.perf_counter() - t0
        timing[key] = round(timing.get(key, 0.0) + dt, 1)
        return dt

    def federate(name: str, view: dict[str, Path], amp_dirs: dict[str, Path] | None = None, synthesis: bool = False,
                 selftrain: bool = False):
        """One federation (Flower simulation) of ``settings.steps`` steps in all; returns the global model."""
        from fadal.config import FederationConfig, SiteSpec
        from fadal.federated.simulation import simulate
        from fadal.model.infer import load_checkpoint

        n = len(view)
        rounds = settings.rounds * (n if settings.federated == "cyclic" else 1)
        local_steps = max(1, round(settings.steps / (n * settings.rounds)))
        specs = [SiteSpec(name=f"site_{s}", data=v, amplified=amp_dirs[s] if amp_dirs else None,
                          use_amplified=bool(amp_dirs)) for s, v in view.items()]
        cfg = FederationConfig(sites=specs, rounds=rounds, local_steps=local_steps, strategy=settings.federated,
                               train=train_cfg, plan=net_plan, evaluate_every=0, out=out / "federations" / name.replace("/", "_"),
                               resume=False, synthesis=syn_cfg if synthesis else None,
                               selftrain_every=rounds // 2 if selftrain else 0, selftrain=st_cfg)
        history = simulate(cfg)
        model, _, _, _ = load_checkpoint(cfg.out / "global_model.pt")
        return model, {"rounds": rounds, "local_steps": local_steps, "steps": rounds * local_steps * (1 if settings.federated == "cyclic" else n),
                       "loss_per_round": [round(r.loss, 4) for r in history.rounds if r.loss is not None]}

    def fit_and_score(name: str, sites: dict, items: list, extra=(), model=None, train_s: float | None = None,
                      fed: dict | None = None) -> None:
        t0 = time.perf_counter()
        if fed is not None:
            model, info = federate(name, **fed)
            train_s, steps, loss = add_time("train_s", t0), info["steps"], info["loss_per_round"][-1]
        elif model is None:
            model, res = train_model(items, net_plan, train_cfg, num_classes, settings.steps, extra)
            train_s, steps, loss = add_time("train_s", t0), res.steps, res.loss
        else:
            steps, loss = None, None
        t1 = time.perf_counter()
        scores = evaluate(model, sites, net_plan)
        runs[name] = {"train_items": len(items), "synthetic_share": round(sum(len(e) for e in extra) / max(len(items) + sum(len(e) for e in extra), 1), 3),
                      "steps": steps, "final_loss": loss, "train_seconds": round(train_s or 0.0, 1),
                      "eval_seconds": round(add_time("eval_s", t1), 1), **scores}
        d = scores["summary"].get("mean", {}).get("dice")
        if fed is not None:
            runs[name]["federation"] = info
        log(f"  {name:<18} mean Dice {d if d is None else round(d, 3)}  (train {train_s or 0:.0f} s, eval {time.perf_counter() - t1:.0f} s)")
        models[name] = model

    models: dict[str, torch.nn.Module] = {}
    num_classes = None
    for k in settings.ks:
        key = f"k{k}"
        log(f"--- k = {k} labeled scan(s) per site, {settings.unlabeled_per_site} unlabeled")
        sites = {s: load_site(v, name=f"site_{s}", validate=False) for s, v in views[key].items()}
        num_classes = next(iter(sites.values())).num_classes
        labeled_items = [it for site in sites.values() for it in site_training_items(site)]
        fed = settings.federated is not None
        if "supervised" in settings.variants:
            fit_and_score(f"{key}/supervised", sites, labeled_items, fed={"view": views[key]} if fed else None)
        if not set(settings.variants) & {"fusion", "synthesis", "selftrain"}:
            continue
        # Multi-atlas fusion; the registrations are cached per site and shared across k (nested atlases).
        t0 = time.perf_counter()
        amp_dirs = {}
        for s, view in views[key].items():
            amp = out / "amplified" / key / f"site_{s}"
            if amp.exists():
                import shutil

                shutil.rmtree(amp)
            amp.mkdir(parents=True)
            shared = out / "registrations" / f"site_{s}"
            shared.mkdir(parents=True, exist_ok=True)
            (amp / "registrations").symlink_to(shared.resolve(), target_is_directory=True)
            amplification[f"{key}/site_{s}"] = amplify_site(view, amp, AmplifyConfig(registration=reg_cfg, max_atlases=k)
                                                            ).model_dump(mode="json", include={
                "n_scans", "n_accepted", "n_rejected", "rejected", "n_atlases", "n_registrations_this_run",
                "n_failed_registrations_this_run", "registration_seconds_this_run", "total_seconds"})
            amp_dirs[s] = amp
            if fed:  # the ClientApp finds the site's learned transforms in its amplified folder (shared across k)
                learned = out / "synthesis_cache" / f"site_{s}"
                learned.mkdir(parents=True, exist_ok=True)
                (amp / "synthesis").symlink_to(learned.resolve(), target_is_directory=True)
        add_time("amplify_s", t0)
        pseudo[f"{key}/fusion"] = pseudo_label_dice(amp_dirs, sites, train_data)
        fused_items = [it for s, site in sites.items() for it in site_training_items(site, amp_dirs[s], True)]
        if "fusion" in settings.variants:
            fit_and_score(f"{key}/fusion", sites, fused_items, fed={"view": views[key], "amp_dirs": amp_dirs} if fed else None)
        synth = {}
        if set(settings.variants) & {"synthesis", "selftrain"}:
            t0 = time.perf_counter()
            share = syn_cfg.fraction / (1.0 - syn_cfg.fraction)
            for s, site in sites.items():
                n_site = len(site_training_items(site, amp_dirs[s], True))
                try:
                    synth[s] = site_synthesizer(site, pre, syn_cfg, out / "synthesis_cache" / f"site_{s}",
                                                length=max(1, round(share * n_site)))
                except FadalInputError as err:  # e.g. every registration of the site failed
                    log(f"    site {s}: no synthesis ({err})")
            add_time("synthesis_learn_s", t0)
            amplification[f"{key}/synthesis"] = {s: p.summary() for s, p in synth.items()}
            if "synthesis" in settings.variants:
                fit_and_score(f"{key}/synthesis", sites, fused_items, list(synth.values()),
                              fed={"view": views[key], "amp_dirs": amp_dirs, "synthesis": True} if fed else None)
        if "selftrain" in settings.variants and fed:  # refined inside the federation, at the sites
            fit_and_score(f"{key}/selftrain", sites, fused_items, list(synth.values()),
                          fed={"view": views[key], "amp_dirs": amp_dirs, "synthesis": True, "selftrain": True})
            refined = {}
            for s, site in sites.items():
                cache = out / "federations" / f"{key}_selftrain" / "cache" / f"site_{s}"
                latest = sorted(cache.glob("selftrain/run*/latest.json"))
                if latest:
                    refined[s] = Path(json.loads(latest[-1].read_text())["labels"])
            pseudo[f"{key}/selftrain"] = pseudo_label_dice(refined, sites, train_data)
        elif "selftrain" in settings.variants:
            t0 = time.perf_counter()
            result = selftrain([SelfTrainSite(site, amp_dirs[s], synth.get(s)) for s, site in sites.items()],
                               out / "selftrain" / key, train_cfg, net_plan, st_cfg, steps=settings.steps,
                               model=models.get(f"{key}/synthesis"), log=lambda m: log("    " + m))
            dt = add_time("selftrain_s", t0)
            last = result.label_dirs[-1]
            pseudo[f"{key}/selftrain"] = pseudo_label_dice({s: last[site.name] for s, site in sites.items()}, sites, train_data)
            items = [it for site in sites.values() for it in site_training_items(site, last[site.name], True)]
            fit_and_score(f"{key}/selftrain", sites, items, list(synth.values()), model=result.model, train_s=dt)
            runs[f"{key}/selftrain"]["rounds"] = result.rounds
            runs[f"{key}/selftrain"]["steps"] = settings.steps
    if settings.full_label:
        log("--- full labels (upper bound)")
        sites = {s: load_site(v, name=f"site_{s}", validate=False) for s, v in views["full"].items()}
        num_classes = next(iter(sites.values())).num_classes
        items = [it for site in sites.values() for it in site_training_items(site)]
        fit_and_score("full", sites, items)
        if settings.federated is not None:
            fit_and_score("full/federated", sites, items, fed={"view": views["full"]})

    doc = {
        "settings": asdict(settings), "train_data": str(train_data), "eval_data": str(eval_data),
        "sites": cases, "plan": net_plan.model_dump(mode="json"), "torch_threads": torch.get_num_threads(),
        "runs": {n: {k: v for k, v in r.items() if k != "per_case"} for n, r in runs.items()},
        "per_case": {n: r["per_case"] for n, r in runs.items()},
        "recovery": recovery(runs), "pseudo_labels": pseudo, "amplification": amplification,
        "timing": {**timing, "total_s": round(time.perf_counter() - t_start, 1)},
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------

def _fmt(x, width: int, digits: int = 3) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_tables(doc: dict, log=print) -> None:
    runs = doc["runs"]
    organs: list[str] = []
    for r in runs.values():
        organs += [o for o in r["summary"] if o not in organs and o != "mean"]
    cols = organs + ["mean"]
    head = f"{'run':<18}" + "".join(f"{o[:10]:>11}" for o in cols)
    for metric, digits, title in (("dice", 3, "Dice per organ (validation cases, pooled over sites; organs scored where drawn)"),
                                  ("hd95", 1, "HD95 per organ (mm; mean over cases where the organ was found)")):
        log(f"\n{title}\n{head}")
        for name, r in runs.items():
            log(f"{name:<18}" + "".join(_fmt(r["summary"].get(o, {}).get(metric), 11, digits) for o in cols))
    if doc["recovery"]:
        log(f"\nFraction of the full-label Dice recovered\n{head}")
        for name, row in doc["recovery"].items():
            log(f"{name:<18}" + "".join(_fmt(row.get(o), 11, 2) for o in cols))
    if doc["pseudo_labels"]:
        log(f"\nPseudo-label Dice against the real labels of the 'unlabeled' scans\n{head}")
        for name, row in doc["pseudo_labels"].items():
            log(f"{name:<18}" + "".join(_fmt(row.get(o), 11, 3) for o in cols))
    t = doc["timing"]
    log("\nTime (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-data", type=Path, default=DEFAULT_DATA, help="OpenKBP folder ('train' cases of cases.json)")
    ap.add_argument("--eval-data", type=Path, default=None, help="folder with the 'validation' cases (default: --train-data)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_label_efficiency")  # runs/ is git-ignored
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 4 min): k=1, 2 unlabeled and 1 validation case per site")
    ap.add_argument("--ks", default=None, help="comma-separated labeled scans per site, e.g. 1,2,4")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per training run")
    ap.add_argument("--unlabeled-per-site", type=int, default=None)
    ap.add_argument("--eval-per-site", type=int, default=None)
    ap.add_argument("--sites", default=None, help="comma-separated OpenKBP sites (default A,B,C)")
    ap.add_argument("--threads", type=int, default=None, help="torch/ITK threads (0 = all cores)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--no-crop", action="store_true", help="the network sees the whole field of view, not the body's box")
    ap.add_argument("--federated", choices=("cyclic", "fedavg", "fedprox"), default=None,
                    help="train every variant as a Flower federation with this strategy (default: pooled)")
    ap.add_argument("--rounds", type=int, default=None, help="federated: rounds per site")
    ap.add_argument("--plan-minutes", type=float, default=None,
                    help="the plan's patch is sized so that --steps steps take about this long (scale it with --steps)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-label runs (compare against an earlier run's)")
    ap.add_argument("--amplified-weight", type=float, default=None,
                    help="patches of a pseudo-labeled scan relative to a real one (TrainConfig.amplified_weight)")
    args = ap.parse_args(argv)
    settings = with_overrides(QUICK if args.quick else DEFAULT, args, ("steps", "unlabeled_per_site", "eval_per_site", "threads", "rounds", "plan_minutes", "amplified_weight"),
                              {"ks": int, "sites": str, "variants": str})
    if args.no_crop:
        settings = replace(settings, crop_to_body=False)
    if args.no_full:
        settings = replace(settings, full_label=False)
    if args.federated:
        settings = replace(settings, federated=args.federated)
    unknown = set(settings.variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    train_data = args.train_data.resolve()
    eval_data = (args.eval_data or args.train_data).resolve()
    for d in {train_data, eval_data}:
        if not (d / "cases.json").exists():
            print(f"{d}: no cases.json (OpenKBP layout expected)", file=sys.stderr)
            return 2
    if settings.federated:
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    doc = run(settings, train_data, eval_data, args.out.resolve())
    print_tables(doc)
    print(f"\ntotal {doc['timing']['total_s']:.0f} s; results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
