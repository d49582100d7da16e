"""The site's own privacy policy: every message is checked before any work; a violation is refused,
never silently followed; an epsilon ledger spans rounds and runs."""

from __future__ import annotations

import json
import math
import re
import stat

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fadal_testing import LABELS, tiny_plan, write_site
from fadal.config import SitePolicy, TrainConfig
from fadal.errors import SiteRefusal
from fadal.federated.client_app import build_client_app
from fadal.federated.epsilon_ledger import EpsilonLedger
from fadal.federated.privacy import composed_epsilon
from fadal.federated.site_task import (SiteRuntime, local_evaluate, local_fingerprint, local_train,
                                       site_from_node_config)
from fadal.model.net import build_network

PLAN = tiny_plan((4, 8), spacing_mm=8.0)
CODE = re.compile(r"FADAL-E-(INPUT|INTERNAL|REFUSED-[a-z-]+)-[0-9a-f]{4}")


def _message(message_type="train", train=TrainConfig(num_threads=1), plan=PLAN, **config) -> Message:
    record = {"local-steps": 2, "server-round": 1, "train-config": train.model_dump_json(),
              "plan": plan.model_dump_json(), "labels": json.dumps(LABELS), **config}
    model = build_network(3, plan.network)
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(record)}),
                   dst_node_id=1, message_type=message_type)


def _nowhere(tmp_path, policy: SitePolicy | None) -> SiteRuntime:
    """A site whose folder does not exist: a check that passes would fail on reading it, so a
    refusal proves that the check ran before any work."""
    return SiteRuntime("s", tmp_path / "no_such_site", None, False, tmp_path / "cache", policy)


@pytest.mark.parametrize("policy,config,rule", [
    (SitePolicy(dp_required=True), {}, "dp-required"),
    (SitePolicy(dp_required=True), {"dp-clip": 1.0, "dp-noise-multiplier": 0.0}, "dp-required"),
    (SitePolicy(min_noise_multiplier=1.0), {"dp-clip": 1.0, "dp-noise-multiplier": 0.5}, "min-noise-multiplier"),
    (SitePolicy(max_clip=0.5), {"dp-clip": 1.0, "dp-noise-multiplier": 1.0}, "max-clip"),
    (SitePolicy(epsilon_budget=5.0), {}, "dp-required"),
    (SitePolicy(secure_aggregation_required=True), {}, "secure-aggregation"),
    (SitePolicy(local_norm_required=True), {"local-norm": False}, "local-norm"),
    (SitePolicy(max_local_steps=1), {}, "max-local-steps"),
    (SitePolicy(max_patch_voxels=16 ** 3 - 1), {}, "max-patch-voxels"),
    (SitePolicy(max_batch_voxels=16 ** 3 - 1), {}, "max-batch-voxels"),  # tiny_plan: batch of 1 x 16^3
    (SitePolicy(max_parameters=100), {}, "max-parameters"),
    (SitePolicy(max_threads=1), {"train-config": TrainConfig(num_threads=4).model_dump_json()}, "max-threads"),
    (None, {"dp-clip": 1.0, "dp-noise-multiplier": float("nan")}, "noise-multiplier"),
    (None, {"dp-clip": 1.0, "dp-noise-multiplier": -1.0}, "noise-multiplier"),
    (None, {"dp-clip": float("nan"), "dp-noise-multiplier": 1.0}, "dp-clip"),
    (None, {"dp-clip": -1.0, "dp-noise-multiplier": 1.0}, "dp-clip"),
])
def test_a_train_message_that_breaks_the_policy_is_refused_before_any_work(tmp_path, policy, config, rule):
    with pytest.raises(SiteRefusal) as err:
        local_train(_message(**config), _nowhere(tmp_path, policy))
    assert err.value.rule == rule
    assert not (tmp_path / "cache" / "privacy_ledger.json").exists()  # nothing spent on a refusal


def test_evaluation_and_fingerprint_opt_outs(tmp_path):
    with pytest.raises(SiteRefusal, match="evaluation"):
        local_evaluate(_message("evaluate"), _nowhere(tmp_path, SitePolicy(evaluation_metrics=False)))
    query = Message(RecordDict({"config": ConfigRecord({"labels": json.dumps(LABELS)})}), dst_node_id=1,
                    message_type="query")
    # The fingerprint is not noised: a site that requires DP does not send it unless it says so.
    with pytest.raises(SiteRefusal, match="fingerprint"):
        local_fingerprint(query, _nowhere(tmp_path, SitePolicy(dp_required=True)))
    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=0)
    runtime = SiteRuntime("s", site, None, False, tmp_path / "cache", SitePolicy(dp_required=True, fingerprint=True))
    assert "fingerprint" in local_fingerprint(query, runtime).content


def test_a_policy_within_its_limits_lets_the_round_run(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=0)
    policy = SitePolicy(max_local_steps=2, max_patch_voxels=16 ** 3, max_batch_voxels=16 ** 3,
                        max_parameters=10 ** 6, max_threads=1, min_noise_multiplier=0.5, max_clip=1.0)
    out = local_train(_message(**{"dp-clip": 1.0, "dp-noise-multiplier": 0.5}),
                      SiteRuntime("s", site, None, False, tmp_path / "cache", policy))
    assert "arrays" in out.content


def _context(partition: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def test_a_plain_train_message_is_refused_where_secagg_is_required(tmp_path):
    """Through the ClientApp: the coordinator gets an error reply with an opaque code only."""
    app = build_client_app([_nowhere(tmp_path, SitePolicy(secure_aggregation_required=True))])
    out = app(_message(), _context())
    assert out.has_error()
    assert CODE.fullmatch(out.error.reason) and "REFUSED-secure-aggregation" in out.error.reason


def _secagg_setup(threshold: int, shares: int = 3) -> Message:
    configs = ConfigRecord({"stage": "setup", "sample_num": shares, "share_num": shares, "threshold": threshold,
                            "clipping_range": 8.0, "target_range": 2 ** 20, "mod_range": 2 ** 32, "max_weight": 100.0})
    return Message(RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1, message_type="train")


def test_secagg_setup_below_the_sites_reconstruction_threshold_is_refused(tmp_path):
    app = build_client_app([_nowhere(tmp_path, SitePolicy(min_reconstruction_threshold=3))])
    refused = app(_secagg_setup(threshold=2), _context())
    assert refused.has_error() and "REFUSED-reconstruction-threshold" in refused.error.reason
    accepted = app(_secagg_setup(threshold=3), _context())  # SecAgg+'s own set-up answers (its public keys)
    assert not accepted.has_error() and RECORD_KEY_CONFIGS in accepted.content
    # Without a policy a threshold of 1 (one colluder unmasks a site) is refused all the same.
    plain = build_client_app([_nowhere(tmp_path, None)])
    assert "REFUSED-reconstruction-threshold" in plain(_secagg_setup(threshold=1), _context()).error.reason


def test_epsilon_ledger_spans_runs_and_refuses_over_budget(tmp_path):
    path = tmp_path / "state" / "privacy_ledger.json"
    budget = composed_epsilon([1.0, 1.0], 1e-5) * 1.01  # two releases at sigma 1 fit, a third does not
    ledger = EpsilonLedger(path, 1e-5)
    first = ledger.spend(1.0, 0.5, run_id=7, server_round=1, budget=budget)
    # A later run (a new ledger object, as in a fresh ClientApp process) sees the earlier release.
    second = EpsilonLedger(path, 1e-5).spend(1.0, 0.5, run_id=8, server_round=1, budget=budget)
    assert first < second <= budget
    with pytest.raises(SiteRefusal) as err:
        EpsilonLedger(path, 1e-5).spend(1.0, 0.5, run_id=8, server_round=2, budget=budget)
    assert err.value.rule == "epsilon-budget"
    data = json.loads(path.read_text())
    assert [(r["run"], r["round"]) for r in data["releases"]] == [(7, 1), (8, 1)]
    assert data["epsilon"] == pytest.approx(second) and "replace-one" in data["adjacency"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert math.isinf(composed_epsilon([1.0, 0.0], 1e-5))  # a release without noise has no guarantee


def test_dp_round_spends_the_ledger_sends_no_scalars_and_keeps_its_state_private(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=2, n_unlabeled=0, n_test=1)
    cache = tmp_path / "cache"
    runtime = SiteRuntime("s", site, None, False, cache, SitePolicy(epsilon_budget=50.0))
    out = local_train(_message(**{"dp-clip": 1.0, "dp-noise-multiplier": 1.0}), runtime)
    # Under DP the only release is the noised update: no loss, no seconds, and every site weighs 1.
    assert dict(out.content["metrics"]) == {"num-examples": 1}
    ledger = json.loads((cache / "privacy_ledger.json").read_text())
    assert len(ledger["releases"]) == 1 and ledger["releases"][0]["noise_multiplier"] == 1.0
    evaluated = local_evaluate(_message("evaluate", **{"dp-clip": 1.0, "dp-noise-multiplier": 1.0}), runtime)
    assert dict(evaluated.content["metrics"]) == {} and "arrays" not in evaluated.content
    # Everything the site keeps (optimiser moments, preprocessed volumes, the ledger) is its own: 0600 / 0700.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert len(files) >= 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [(p, oct(p.stat().st_mode)) for p in files]


def test_deployment_reads_the_policy_file_named_in_node_config(tmp_path):
    policy = tmp_path / "site_policy.yaml"
    policy.write_text(yaml.safe_dump({"dp_required": True, "min_noise_multiplier": 0.8, "ledger": "ledger.json"}))
    runtime = site_from_node_config({"data-path": str(tmp_path / "site"), "policy-path": str(policy)})
    assert runtime.policy.min_noise_multiplier == 0.8 and runtime.policy.requires_dp
    assert runtime.ledger().path == tmp_path / "ledger.json"  # relative to the policy file


def test_fadal_site_hands_its_policy_to_every_clientapp(tmp_path, monkeypatch):
    """`fadal site --policy` checks the file once, then names it in the SuperNode's node config
    (read by each ClientApp process); a broken policy stops the command with the file's name."""
    from typer.testing import CliRunner

    from fadal.cli import app
    from fadal.federated import certificates, processes

    started: list[list[str]] = []
    monkeypatch.setattr(processes.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or object())
    monkeypatch.setattr(processes, "wait_foreground", lambda procs: 0)
    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=0)
    policy = tmp_path / "site_policy.yaml"
    policy.write_text("dp_required: true\n")
    keys = certificates.make_site_keys(tmp_path / "keys", "site_A")["private_key"].parent  # the hospital's folder
    (keys / "ca.crt").write_bytes(b"")  # the coordinator's; fadal site only checks that it is there
    args = ["site", "--data", str(site), "--name", "site_A", "--server", "127.0.0.1:9", "--certs", str(keys),
            "--home", str(tmp_path / "home"), "--policy", str(policy)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    node_config = started[0][started[0].index("--node-config") + 1]
    assert f"policy-path='{policy.resolve().as_posix()}'" in node_config
    policy.write_text("dp_requird: true\n")  # a typo is an error, not a policy that allows everything
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "site_policy.yaml" in res.output and len(started) == 1
