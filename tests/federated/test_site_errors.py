"""Errors leave a site as opaque codes: nothing of the site's paths, case ids, label set or counts
reaches the coordinator; the full message stays in the site's own log."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
from flwr.app import Context, RecordDict

from fadal_testing import LABELS, write_site
from fadal.config import FederationConfig, SitePolicy, SiteSpec, TrainConfig
from fadal.federated.client_app import build_client_app
from fadal.federated.site_task import SiteRuntime
from test_site_policy import PLAN, _message

CODE = re.compile(r"FADAL-E-(INPUT|INTERNAL|REFUSED-[a-z-]+)-[0-9a-f]{4}")
SITE_LABELS = {"background": 0, "liver": 1, "spleen": 2}


class Captured(logging.Handler):
    """Everything logged through Flower's logger in this process (with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record))


@pytest.fixture
def flower_log():
    handler = Captured()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def mismatched_site(root):
    """A site whose label set differs from the federation's (the error names both, and the path)."""
    write_site(root, n_labeled=1, n_unlabeled=0, n_test=1)
    data = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**data, "labels": SITE_LABELS}))
    return root


def missing_file_site(root):
    """A labeled case whose image is gone (a dangling link): reading it names the file, i.e. the case id."""
    write_site(root, n_labeled=1, n_unlabeled=0, n_test=1)
    shutil.copy(root / "labelsTr" / "case_000.nii.gz", root / "labelsTr" / "case_077.nii.gz")
    (root / "imagesTr" / "case_077_0000.nii.gz").symlink_to(root / "gone" / "case_077_0000.nii.gz")
    return root


def assert_opaque(reason: str, tmp_path) -> None:
    assert CODE.fullmatch(reason), reason
    for secret in (str(tmp_path), "case_", "liver", "spleen", "organA", "/", "{"):
        assert secret not in reason, (secret, reason)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_label_mismatch_missing_file_and_refusals_reach_the_coordinator_as_codes(tmp_path, flower_log, monkeypatch):
    import fadal.evaluate.evaluate as evaluate

    cases = {
        "label-set mismatch": (SiteRuntime("a", mismatched_site(tmp_path / "a"), None, False, tmp_path / "ca"),
                               _message(), "INPUT"),
        "missing file": (SiteRuntime("b", missing_file_site(tmp_path / "b"), None, False, tmp_path / "cb"),
                         _message(), "(INPUT|INTERNAL)"),  # MONAI may wrap the reader's error
        "policy": (SiteRuntime("c", write_site(tmp_path / "c", n_labeled=1), None, False, tmp_path / "cc",
                               SitePolicy(max_local_steps=1)), _message(), "REFUSED-max-local-steps"),
    }
    for name, (runtime, msg, kind) in cases.items():
        out = build_client_app([runtime])(msg, _context())
        assert out.has_error(), name
        assert_opaque(out.error.reason, tmp_path)
        assert re.match(f"FADAL-E-{kind}-", out.error.reason), (name, out.error.reason)
        # The site's own log has the code and the whole story.
        line = next(x for x in flower_log.lines if out.error.reason in x)
        assert str(tmp_path) in line or "local-steps 2" in line, line

    # A metric the allow-list does not know (a per-case Dice) is refused, not sent.
    monkeypatch.setattr(evaluate, "evaluate_model_on_cases",
                        lambda *a, **k: {"summary": {"case_003": {"dice": 0.4}, "mean": {"dice": 0.4}}})
    runtime = SiteRuntime("d", write_site(tmp_path / "d", n_labeled=1, n_test=1), None, False, tmp_path / "cd")
    out = build_client_app([runtime])(_message("evaluate"), _context())
    assert_opaque(out.error.reason, tmp_path)
    assert out.error.reason.startswith("FADAL-E-REFUSED-metric-allow-list-")
    assert any("case_003" in x and out.error.reason in x for x in flower_log.lines)


def test_in_a_simulated_federation_the_server_sees_codes_only(tmp_path, flower_log, monkeypatch):
    """Three sites, one healthy, one with another label set, one with a missing image: the round
    completes on the healthy one (min_sites 1); what the ServerApp received and logged names
    nothing of the others."""
    import fadal.federated.server_app as server_app
    from fadal.federated.simulation import simulate

    reasons: list[str] = []
    build = server_app.build_strategy

    def recording_strategy(*args, **kwargs):
        strategy = build(*args, **kwargs)
        aggregate = strategy.aggregate_train

        def aggregate_train(rnd, replies):
            replies = list(replies)
            reasons.extend(m.error.reason for m in replies if m.has_error())
            return aggregate(rnd, replies)

        strategy.aggregate_train = aggregate_train
        return strategy

    monkeypatch.setattr(server_app, "build_strategy", recording_strategy)
    good = write_site(tmp_path / "site_0", n_labeled=1, n_unlabeled=0, n_test=0)
    sites = [good, mismatched_site(tmp_path / "site_1"), missing_file_site(tmp_path / "site_2")]
    cfg = FederationConfig(sites=[SiteSpec(name=p.name, data=p) for p in sites], rounds=1, local_steps=1,
                           min_sites=1, evaluate_every=0, labels=LABELS, train=TrainConfig(num_threads=1), plan=PLAN,
                           out=tmp_path / "run")
    history = simulate(cfg)
    assert history.rounds[0].sites == 1 and history.rounds[0].failures == 2
    assert len(reasons) == 2
    for reason in reasons:
        assert_opaque(reason, tmp_path)
    server_lines = [x for x in flower_log.lines if "Received error in reply" in x]
    assert len(server_lines) == 2 and all(CODE.search(x) for x in server_lines)
    # The ServerApp's whole log in this process. The sites' ClientApps run in this process too (the in-process
    # simulation backend): their own full log records, which stay at the site, are left out.
    site_side = [x for x in flower_log.lines if "this text stays at the site" in x]
    assert len(site_side) == 2
    for line in (x for x in flower_log.lines if x not in site_side):
        assert str(tmp_path / "site_1") not in line and str(tmp_path / "site_2") not in line, line
        assert "spleen" not in line and "case_077" not in line, line
