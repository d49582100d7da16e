"""`fadal amplify`: the whole chain at one site, from one config: fusion, then synthesis, then self-training.

Outputs (``out``, one folder per site)::

    labels/ confidence/ provenance/ registrations/ fusion.json    fusion and QC (amplify/pipeline.py)
    synthesis/                the learned atlas -> scan transforms (content-keyed cache, amplify/synthesize.py);
                              training draws new labeled pairs from them on the fly, nothing is written per pair
    selftrain/model_<key>/round_1/   labels refined by a given network (``selftrain.model``), or
    selftrain/round_<r>/<site>/      labels refined by the site's own network (trained here), per round
    amplification.json        a :class:`fadal.records.AmplificationReport`: per stage what was made,
                              accepted and rejected and why, and ``training_labels``, the folder whose
                              labels/confidence/provenance training reads (:func:`fadal.model.patches.training_label_dir`)

Every stage resumes: fusion per scan, synthesis per transform (its cache), refinement by a given model
per scan; a finished self-training run with the same settings is not redone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from fadal.amplify.cache import KEY_CHARS, path_digest
from fadal.amplify.pipeline import Progress, amplify_site
from fadal.amplify.selftrain import SelfTrainSite, refine_site, selftrain
from fadal.amplify.synthesize import SyntheticPairs, site_synthesizer, synthetic_length
from fadal.config import AmplifyConfig, SelfTrainConfig, SynthesisConfig
from fadal.data.io import read_record, write_record
from fadal.data.site import Site, load_site
from fadal.errors import FadalInputError
from fadal.model.patches import site_training_items
from fadal.records import AmplificationReport, Plan, SelfTrainStage, SynthesisStage

Log = Callable[[str], None]


def stage_plan(site: Site, cfg: AmplifyConfig) -> Plan:
    """The grid synthesis and self-training work on: ``cfg.plan``, else the given model's, else this site's."""
    if cfg.plan is not None:
        return read_record(Plan, cfg.plan, "plan")
    if cfg.selftrain is not None and cfg.selftrain.model is not None:
        from fadal.model.infer import load_checkpoint

        return load_checkpoint(cfg.selftrain.model)[2]
    from fadal.plan.planner import plan_for_sites

    return plan_for_sites([site], cfg.planner)


def synthesis_stage(site: Site, out: Path, cfg: SynthesisConfig, plan: Plan, n_items: int
                    ) -> tuple[SynthesisStage, SyntheticPairs | None]:
    """Learn (or load from ``out/synthesis``) every atlas -> unlabeled-scan transform; report what was kept."""
    t0 = time.perf_counter()
    cache = out / "synthesis"
    targets = [c.case_id for c in site.unlabeled[: cfg.max_targets]]
    try:
        pairs = site_synthesizer(site, plan.preprocess, cfg, cache, synthetic_length(cfg, n_items))
    except FadalInputError as err:  # every registration of the site failed: a finding, not a user error
        return SynthesisStage(atlases=[c.case_id for c in site.labeled], targets=targets, transforms_kept=0,
                              transforms_rejected=[{"atlas": "all", "target": "all", "reason": str(err)}],
                              transforms_cached=0, combinations=0, spacing_mm=plan.preprocess.spacing_mm,
                              cache=str(cache), seconds=round(time.perf_counter() - t0, 2)), None
    summary = pairs.summary()
    kept = [t for ts in summary["transforms"].values() for t in ts]
    return SynthesisStage(
        atlases=summary["atlases"], targets=targets, transforms_kept=len(kept),
        transforms_rejected=[{k: str(v) for k, v in r.items()} for r in summary["rejected"]],
        transforms_cached=sum(1 for t in kept if t["cached"]), combinations=summary["combinations"],
        spacing_mm=plan.preprocess.spacing_mm, cache=str(cache), seconds=round(time.perf_counter() - t0, 2)), pairs


def _round_row(summary: dict, seconds: float) -> dict:
    per_case = summary["per_case"]
    return {"round": summary["round"], "scans": summary["scans"], "accepted": summary["accepted"],
            "rejected": {c: v.get("reasons") or [v.get("skipped", "rejected")]
                         for c, v in per_case.items() if not v.get("qc")},
            "seconds": round(seconds, 2)}


def _settings_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:KEY_CHARS]


def selftrain_stage(site: Site, out: Path, cfg: SelfTrainConfig, plan: Plan, pairs: SyntheticPairs | None,
                    log: Log | None = None) -> SelfTrainStage:
    """Refine the fused labels with ``cfg.model`` (once, per scan resumable), or train the site's own
    network and run ``cfg.rounds`` refine/retrain rounds (:func:`fadal.amplify.selftrain.selftrain`)."""
    t0 = time.perf_counter()
    sts = SelfTrainSite(site, out, pairs)
    root = out / "selftrain"
    if cfg.model is not None:
        from fadal.model.infer import load_checkpoint

        model, labels, _, _ = load_checkpoint(cfg.model)
        if labels != site.labels:
            raise FadalInputError(f"{cfg.model}: the model's labels {labels} differ from {site.root / 'dataset.json'}'s "
                                  f"{site.labels}; refine with a model trained on this label set")
        key = _settings_key(path_digest(cfg.model).hex(), cfg.model_dump_json(exclude={"model", "train"}),
                            plan.model_dump_json())
        round_dir = root / f"model_{key}" / "round_1"
        summary = refine_site(model, sts, round_dir, plan, cfg, 1, resume=True)
        return SelfTrainStage(model=str(cfg.model), rounds=[_round_row(summary, time.perf_counter() - t0)], key=key,
                              labels=str(round_dir.relative_to(out)), seconds=round(time.perf_counter() - t0, 2))
    key = _settings_key(cfg.model_dump_json(exclude={"model"}), plan.model_dump_json(),
                        json.dumps(sorted((f.name, f.stat().st_mtime_ns) for f in (out / "provenance").glob("*.json"))), json.dumps({a: [t["target"] for t in ts] for a, ts in pairs.summary()["transforms"].items()}) if pairs is not None else "")
    done = root / "stage.json"
    if done.exists() and (stage := read_record(SelfTrainStage, done, "self-training stage")).key == key:
        return stage  # the same run finished before: not redone
    result = selftrain([sts], root, cfg.train, plan, cfg, steps=cfg.train.steps, log=log)
    rounds = [_round_row(json.loads((dirs[site.name] / "selftrain.json").read_text()), r.get("refine_seconds", 0.0))
              for dirs, r in zip(result.label_dirs, result.rounds[1:])]
    stage = SelfTrainStage(model=f"trained here: {root / 'model.pt'}", rounds=rounds, key=key,
                           labels=str(result.label_dirs[-1][site.name].relative_to(out)),
                           seconds=round(time.perf_counter() - t0, 2))
    write_record(stage, done)
    return stage


def amplify_chain(site: Site, out: Path, cfg: AmplifyConfig, progress: Progress | None = None,
                  log: Log | None = None) -> AmplificationReport:
    """Fusion, then synthesis (``cfg.synthesis``), then self-training (``cfg.selftrain``) at one site."""
    out = Path(out)
    fusion = amplify_site(site, out, cfg, progress)
    synthesis, pairs, selftraining, training = None, None, None, "."
    if cfg.synthesis is not None or cfg.selftrain is not None:
        plan = stage_plan(site, cfg)
        if cfg.synthesis is not None:
            n_items = len(site_training_items(site, out, True))
            synthesis, pairs = synthesis_stage(site, out, cfg.synthesis, plan, n_items)
            if log is not None:
                log(f"{site.name}: synthesis kept {synthesis.transforms_kept} transforms "
                    f"({len(synthesis.transforms_rejected)} rejected) in {synthesis.seconds:.0f} s")
        if cfg.selftrain is not None:
            selftraining = selftrain_stage(site, out, cfg.selftrain, plan, pairs, log)
            training = selftraining.labels
    report = AmplificationReport(site=str(site.root), fusion=fusion, synthesis=synthesis, selftrain=selftraining,
                                 training_labels=training)
    write_record(report, out / "amplification.json")
    return report


def amplify_sites(sites: list[Path], out: Path, cfg: AmplifyConfig, progress: Progress | None = None,
                  log: Log | None = None) -> dict[str, AmplificationReport]:
    """Amplify each site into ``out/<site folder name>`` (resumable). Every site is read and checked
    before the first is amplified: a bad file stops the run before anything is written."""
    loaded = [load_site(s) for s in sites]
    return {Path(s).name: amplify_chain(site, out / Path(s).name, cfg, progress, log)
            for s, site in zip(sites, loaded)}
