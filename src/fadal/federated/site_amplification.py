"""Amplification inside the federation, at the site: synthetic pairs and pseudo-labels refined by the global model.

Both happen where the data are, between and during rounds, and add nothing to what a site sends (its
reply is still :func:`fadal.federated.site_task.reply`'s arrays and allow-listed scalars):

* ``synthesis``: the site draws synthetic labeled pairs on the fly from its own learned transforms
  (:mod:`fadal.amplify.synthesize`), cached in its amplified folder's ``synthesis/`` (what `fadal amplify`
  learned, when the plan's grid matches) or else in its local cache; learned once, then loaded.
* ``selftrain-every`` K: in the first round it is asked to train at least K rounds after its last
  refinement (rounds K+1, 2K+1, ... when it trains every round), the site first refines its pseudo-labels with the
  global model it just received (:func:`fadal.amplify.selftrain.refine_site`: the model's confident
  voxels against the fusion, QC'd) into ``CACHE/selftrain/run<id>/round_<r>/``, and trains on the
  latest refinement from then on. A restarted site (a deployment's fresh process per message) finds
  the latest in ``CACHE/selftrain/run<id>/latest.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fadal.config import SelfTrainConfig, SynthesisConfig
from fadal.data.io import PRIVATE, private_dir, write_json
from fadal.data.site import Site
from fadal.errors import FadalInputError
from fadal.records import Plan


def synthetic_pairs(site: Site, amplified: Path | None, cache_dir: Path, cfg: SynthesisConfig, plan: Plan,
                    n_items: int) -> torch.utils.data.Dataset | None:
    """The site's synthetic-pair sampler (a share ``cfg.fraction`` of ``n_items``), or None when no
    transform is usable (every registration failed, or no unlabeled scan): training goes on without.
    (Amplification code is imported only by a site that uses it: a ClientApp stays light.)"""
    from fadal.amplify.synthesize import site_synthesizer, synthetic_length

    if not site.unlabeled or not site.labeled:
        return None
    cache = Path(amplified) / "synthesis" if amplified is not None else private_dir(cache_dir / "synthesis")
    try:
        return site_synthesizer(site, plan.preprocess, cfg, cache, synthetic_length(cfg, n_items))
    except FadalInputError:
        return None


def _state_path(cache_dir: Path, run_id: int) -> Path:
    return cache_dir / "selftrain" / f"run{run_id}" / "latest.json"


def latest_refinement(cache_dir: Path, run_id: int) -> tuple[Path | None, int]:
    """This run's latest refinement at the site: its labels folder and round; (None, 1) before the first
    (the model of round 1 is the first one a site could refine with)."""
    state = _state_path(cache_dir, run_id)
    if not state.exists():
        return None, 1
    doc = json.loads(state.read_text())
    return Path(doc["labels"]), int(doc["round"])


def is_refinement_round(server_round: int, every: int, last_round: int = 1) -> bool:
    """True once the global model has had ``every`` rounds since the site's last refinement (rounds
    K+1, 2K+1, ... when the site trains every round). Counted from the site's own last refinement, not
    from fixed rounds: under 'cyclic' or fraction_train < 1 a site is not asked every round, and a fixed
    schedule would skip a site that is never asked in round K+1."""
    return every > 0 and server_round > 1 and server_round - last_round >= every


def refine_with_global_model(model: torch.nn.Module, site: Site, amplified: Path | None, cache_dir: Path,
                             cfg: SelfTrainConfig, plan: Plan, run_id: int, server_round: int) -> Path:
    """Refine the site's pseudo-labels with the received global model (on-site, QC'd); return the folder.

    The baseline is the fusion (``amplified``) when the site has one, else the model alone on the
    organs the site's labeled cases drew."""
    from fadal.amplify.selftrain import SelfTrainSite, refine_site

    out = private_dir(cache_dir / "selftrain" / f"run{run_id}") / f"round_{server_round}"
    refine_site(model, SelfTrainSite(site, amplified), out, plan, cfg, server_round, resume=True)  # inference sets eval, fit train
    write_json({"round": server_round, "labels": str(out)}, _state_path(cache_dir, run_id), mode=PRIVATE)
    return out
