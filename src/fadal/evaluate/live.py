"""A federation's live page: ``report.html`` rewritten after every round while the run goes on (progress, each
site's status, curves so far), so that an operator can watch a long run in a browser. It imports none of the
training code: the coordinator's round loop (:mod:`fadal.federated.rounds`) writes it."""

from __future__ import annotations

from pathlib import Path

from fadal.config import FederationConfig
from fadal.evaluate.report import RunStatus, write_report
from fadal.records import FederationHistory


def live_federation_page(cfg: FederationConfig, history: FederationHistory, state: str = "running",
                         detail: str = "", refresh_seconds: int = 30) -> Path:
    """``cfg.out/report.html`` (and report.md) of a federation under way, rewritten after every round (each
    file atomically): rounds done, each site's status (answered / failed / no reply) and training seconds,
    the loss and Dice curves so far and the last federated evaluation. While ``state`` is ``running`` the page
    reloads itself, so an operator can leave it open in a browser. Only what the server holds anyway (the
    history): no per-case value. The finished run's report (:func:`fadal.evaluate.federation.federation_report`) replaces it."""
    name = f"federated ({cfg.strategy})"
    out = Path(cfg.out)
    status = RunStatus(state, rounds_done(history), cfg.rounds, detail, refresh_seconds)
    paths = write_report(out, federated_evaluation(name, history) or {"variants": {}},
                         history={name: history.report_rounds()}, title=f"FADAL federation: {out.name}",
                         status=status)
    return paths["html"]


def federated_evaluation(name: str, history: FederationHistory) -> dict | None:
    """The metrics document of the last federated evaluation: organ Dice averaged over the sites that
    scored it, all that reaches the server (None before any)."""
    scored = [r for r in history.rounds if r.dice]
    if not scored:
        return None
    last = scored[-1]
    organs = {o: {"dice": v} for o, v in last.dice.items()}
    return {"variants": {name: {f"sites (federated evaluation, round {last.round})": organs}}}


def rounds_done(history: FederationHistory) -> int:
    """The last round that was aggregated (0 before any)."""
    return max((r.round for r in history.rounds if r.loss is not None), default=0)
