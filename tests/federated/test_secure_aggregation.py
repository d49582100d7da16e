"""Secure aggregation (Flower SecAgg+): a real 3-site simulation whose round-1 global model is the
example-weighted mean of the sites' own round-1 models (up to quantisation), while what the server
received from each site was masked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from pydantic import ValidationError

from fadal_testing import write_site
from fadal.config import FederationConfig, SiteSpec, TrainConfig
from fadal_testing import tiny_plan
from fadal.federated.site_task import SiteRuntime, local_train
from fadal.federated.rounds import train_config_record
from fadal.federated.simulation import federation_labels, simulate
from fadal.model.infer import load_checkpoint
from fadal.model.net import build_network
from fadal.model.engine import seed_everything

TRAIN = TrainConfig(seed=5, num_threads=1)
PLAN = tiny_plan((4, 8, 16), spacing_mm=4.0)


def _cfg(tmp_path, n_labeled=(1, 2, 3), **kw) -> FederationConfig:
    sites = [write_site(tmp_path / f"site_{k}", n_labeled=n, n_unlabeled=0, n_test=1) for k, n in enumerate(n_labeled)]
    return FederationConfig(sites=[SiteSpec(name=f"site_{k}", data=p) for k, p in enumerate(sites)], rounds=2,
                            train=TRAIN, plan=PLAN, evaluate_every=2,
                            out=tmp_path / "run", **kw)


def _site_round1(cfg: FederationConfig, labels: dict[str, int], initial: dict, k: int, tmp_path) -> tuple[dict, int]:
    """What site ``k`` trains in round 1 from the initial model, run here in the open (the reference)."""
    config = train_config_record(cfg, labels, cfg.plan)
    config["server-round"] = 1
    msg = Message(RecordDict({"arrays": ArrayRecord(initial), "config": config}), dst_node_id=1, message_type="train")
    site = cfg.sites[k]
    out = local_train(msg, SiteRuntime(site.name, site.data, None, False, tmp_path / "ref_cache" / site.name))
    return out.content["arrays"].to_torch_state_dict(), int(out.content["metrics"]["num-examples"])


def test_secagg_three_sites_weighted_mean_and_masked(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, secure_aggregation=True)
    received: list[np.ndarray] = []  # every array the server decoded in the masked-vector stage
    decode = secaggplus_workflow.bytes_to_ndarray
    monkeypatch.setattr(secaggplus_workflow, "bytes_to_ndarray", lambda b: received.append(decode(b)) or received[-1])

    history = simulate(cfg)

    run = tmp_path / "run"
    rounds = [r for r in history.rounds if r.loss is not None]
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.sites == 3 and r.failures == 0 and r.bytes_up > 0 for r in rounds)
    assert "mean" in rounds[-1].dice  # federated evaluation still works beside SecAgg+
    assert json.loads((run / "history.json").read_text())["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert all((run / "checkpoints" / f"round_{r:03d}.pt").exists() for r in (1, 2))

    # The reference: each site's round-1 model trained here from the same initial model.
    labels = federation_labels(cfg)
    seed_everything(cfg.train.seed)
    initial = build_network(max(labels.values()) + 1, cfg.plan.network).state_dict()
    sites = [_site_round1(cfg, labels, initial, k, tmp_path) for k in range(3)]
    total = sum(n for _, n in sites)
    expected = {key: sum(n * s[key].double() for s, n in sites) / total for key in initial}
    r1 = load_checkpoint(run / "checkpoints" / "round_001.pt")[0].state_dict()
    error = max(float((r1[k].double() - expected[k]).abs().max()) for k in expected)
    # Quantisation bound: sites x step / sum of weights, step = 2 x clip / 2**bits, weight = n / max_weight.
    bound = 3 * 2 * cfg.secagg_clipping_range / 2 ** cfg.secagg_quantization_bits / (total / cfg.secagg_max_weight)
    assert error <= bound + 1e-6, (error, bound)
    assert max(float((r1[k] - s[k]).abs().max()) for s, _ in sites for k in initial) > 10 * bound  # not one site's

    # What the server received from each site: uniform-looking integers mod 2**32, far outside the
    # quantisation range [0, 2**bits] that an unmasked (quantised, weighted) model lives in.
    n_arrays = len(initial) + 1  # + the site's quantised weight
    assert len(received) == 2 * 3 * n_arrays
    for site in range(3):
        vector = np.concatenate([a.ravel() for a in received[site * n_arrays:(site + 1) * n_arrays]])
        assert np.mean(vector > 2 ** (cfg.secagg_quantization_bits + 2)) > 0.9


@pytest.mark.parametrize("change, message", [
    ({"strategy": "fedadam"}, "supports strategy"),
    ({"strategy": "fedbn"}, "supports strategy"),
    ({"transfer_dtype": "float16"}, "float32"),
    ({"secagg_reconstruction_threshold": 1}, "reconstruction_threshold"),
    ({"secagg_num_shares": 2}, "num_shares"),
    ({"secagg_quantization_bits": 30}, "overflows"),
])
def test_secagg_config_rejects_what_it_cannot_do(tmp_path, change, message):
    sites = [SiteSpec(name=f"s{k}", data=tmp_path / f"s{k}") for k in range(5)]
    with pytest.raises(ValidationError, match=message):
        FederationConfig(sites=sites, secure_aggregation=True, **change)
    FederationConfig(sites=sites, secure_aggregation=False, **change)  # fine without it
    with pytest.raises(ValidationError, match="at least 2 sites"):
        FederationConfig(sites=sites[:1], secure_aggregation=True)


def _legacy_train_message(cfg: FederationConfig, labels: dict[str, int], initial: dict, clip: float) -> Message:
    """A SecAgg+ collect-masked-vectors train message as the site's handler gets it (legacy FitIns)."""
    from flwr.app import ConfigRecord
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.compat.common import recorddict_compat as compat

    config = {**dict(train_config_record(cfg, labels, cfg.plan)), "server-round": 1, "secagg-clipping-range": clip,
              "secagg-max-weight": 100.0}
    params = ndarrays_to_parameters([v.numpy() for v in initial.values()])
    content = compat.fitins_to_recorddict(FitIns(params, config), keep_input=True)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({})
    return Message(content, dst_node_id=1, message_type="train")


def test_secure_train_replies_fitres_and_refuses_clipping(tmp_path):
    """The site's legacy reply: only the trained arrays (unnamed, in state-dict order), the example
    count and allow-listed metrics; and no reply at all if a value would be clipped unseen."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fadal.errors import FadalInputError
    from fadal.federated.site_task import ALLOWED_METRICS
    from fadal.federated.secure_aggregation_site import is_secure_train, secure_train

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, n_labeled=(2, 2))
    labels = federation_labels(cfg)
    seed_everything(cfg.train.seed)
    initial = build_network(max(labels.values()) + 1, cfg.plan.network).state_dict()
    runtime = SiteRuntime("site_0", cfg.sites[0].data, None, False, tmp_path / "cache")
    msg = _legacy_train_message(cfg, labels, initial, clip=8.0)
    assert is_secure_train(msg)
    fitres = compat.recorddict_to_fitres(secure_train(msg, runtime).content, keep_input=True)
    assert fitres.num_examples == 2 and set(fitres.metrics) <= set(ALLOWED_METRICS)
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert [a.shape for a in arrays] == [tuple(v.shape) for v in initial.values()]
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(arrays, initial.values()))  # it trained
    with pytest.raises(FadalInputError, match="secagg_clipping_range"):
        secure_train(_legacy_train_message(cfg, labels, initial, clip=1e-3), runtime)
