"""The report of a finished federation: every site's held-out scores where the data is here (simulation),
the federated evaluation the coordinator received otherwise (deployment). While it runs, the live page
(:mod:`fadal.evaluate.live`) stands in its place."""

from __future__ import annotations

import copy
from pathlib import Path

from fadal.config import FederationConfig
from fadal.data.io import write_json
from fadal.data.site import load_site
from fadal.evaluate.evaluate import evaluate_model_on_cases
from fadal.evaluate.live import federated_evaluation, rounds_done
from fadal.evaluate.metrics_document import metrics_document
from fadal.evaluate.report import RunStatus, write_report
from fadal.model.infer import load_checkpoint
from fadal.model.net import pick_device
from fadal.records import FederationHistory


def federation_report(cfg: FederationConfig, history: FederationHistory, evaluate_sites: bool = True
                      ) -> dict[str, Path] | None:
    """The report of a finished federation, in ``cfg.out`` (report.html/.md, metrics.json).

    ``evaluate_sites`` (simulation: every site's folder is on this machine) scores the global model on
    each site's held-out cases, per organ and per site; under FedBN with the site's own normalisation
    layers. Otherwise (deployment: the coordinator holds no data) the metrics are the federated
    evaluation of the last round: organ Dice averaged over the sites, all that reaches the server.
    None when there is nothing to score (no held-out cases, ``evaluate_every=0``)."""
    out = Path(cfg.out)
    name = f"federated ({cfg.strategy})"
    doc: dict | None = None
    if evaluate_sites:
        # Here, not at the top: Flower's simulation engine (Ray) is not needed on the deployment path.
        from fadal.federated.simulation import site_runtimes
        from fadal.federated.site_task import restore_local_norm

        model, labels, plan, _ = load_checkpoint(out / "global_model.pt")
        results: dict[str, dict] = {}
        for runtime in site_runtimes(cfg):
            site = load_site(runtime.data, name=runtime.name)
            if not site.test:
                continue
            site_model = model
            if cfg.strategy == "fedbn":
                site_model = copy.deepcopy(model)
                restore_local_norm(site_model, runtime)
            results[runtime.name] = evaluate_model_on_cases(site_model, site, site.test, plan, pick_device(),
                                                            out / "predictions" / runtime.name)
        if results:
            doc = metrics_document({name: results})
    if doc is None:
        doc = federated_evaluation(name, history)
    if doc is None:
        return None
    write_json(doc, out / "metrics.json")
    return write_report(out, doc, history={name: history.report_rounds()}, title=f"FADAL federation: {out.name}",
                        status=RunStatus("finished", rounds_done(history), cfg.rounds))

