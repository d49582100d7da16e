"""Strategies: Flower's FedAvg/FedAdam/FedYogi (+ FedProx and FedBN), one way of recording rounds.

Most tests drive real rounds without Ray: the strategy builds the messages, the real
``local_train`` answers them, the strategy aggregates (:func:`drive_round`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from fadal_testing import LABELS, write_site
from fadal.config import FederationConfig, SiteSpec, TrainConfig
from fadal_testing import tiny_plan
from fadal.federated.site_task import SiteRuntime, local_norm_path, local_train
from fadal.federated.rounds import train_config_record
from fadal.federated.strategies import RecordingMixin, build_strategy
from fadal.model.net import build_network, norm_state_keys
from fadal.records import FederationHistory

TINY = TrainConfig(seed=1)
PLAN = tiny_plan((4, 8), spacing_mm=8.0)


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def fed_config(tmp_path, sites, **kw) -> FederationConfig:
    return FederationConfig(sites=[SiteSpec(name=f"s{k}", data=p) for k, p in enumerate(sites)],
                            train=kw.pop("train", TINY), plan=kw.pop("plan", PLAN), out=tmp_path / "run",
                            local_steps=kw.pop("local_steps", 2), **kw)


def drive_round(strategy, server_round: int, arrays: ArrayRecord, record: ConfigRecord, answer) -> tuple:
    """One training round in-process: configure -> every site's ``answer(node_id, msg)`` -> aggregate."""
    messages = list(strategy.configure_train(server_round, arrays, record, FakeGrid(answer.nodes)))
    replies = [answer(m.metadata.dst_node_id, m) for m in messages]
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return messages, replies, new_arrays, metrics


class Sites:
    """Node id -> the real ClientApp training function on that node's site."""

    def __init__(self, runtimes: dict[int, SiteRuntime]):
        self.runtimes = runtimes
        self.nodes = list(runtimes)

    def __call__(self, node: int, msg: Message) -> Message:
        return local_train(msg, self.runtimes[node])


def two_sites(tmp_path) -> tuple[list, Sites]:
    paths = [write_site(tmp_path / f"site_{k}", n_labeled=1 + k, n_unlabeled=0, n_test=0) for k in range(2)]
    runtimes = {101 + k: SiteRuntime(f"s{k}", p, None, False, tmp_path / f"cache_{k}") for k, p in enumerate(paths)}
    return paths, Sites(runtimes)


@pytest.mark.parametrize("name,cls", [("fedavg", FedAvg), ("fedprox", FedAvg), ("fedadam", FedAdam),
                                      ("fedyogi", FedYogi), ("fedbn", FedAvg)])
def test_build_strategy_uses_flowers_strategy_with_recording(tmp_path, name, cls):
    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"], strategy=name, proximal_mu=0.05,
                     fedopt={"eta": 0.03, "tau": 1e-4})
    strategy = build_strategy(cfg, 2, FederationHistory())
    assert isinstance(strategy, cls) and isinstance(strategy, RecordingMixin)
    record = train_config_record(cfg, LABELS, cfg.plan)
    assert record["proximal-mu"] == (0.05 if name == "fedprox" else 0.0)
    assert record["local-norm"] == (name == "fedbn")
    if name == "fedbn":
        assert cfg.plan.network.norm == "instance-affine"  # FedBN needs norm layers with parameters
        assert strategy.local_keys == set(norm_state_keys(build_network(3, cfg.plan.network))) != set()
    else:
        assert cfg.plan.network.norm == "instance" and not strategy.local_keys
    if name in ("fedadam", "fedyogi"):
        assert strategy.eta == 0.03 and strategy.tau == 1e-4


def _constant_reply(msg: Message, value: float, n: int, dtype=np.float32) -> Message:
    arrays = ArrayRecord({k: Array(np.full(a.shape, value, dtype=dtype)) for k, a in msg.content["arrays"].items()})
    metrics = MetricRecord({"num-examples": n, "train-loss": value, "train-seconds": 0.1})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def test_fedavg_weights_by_num_examples_and_records_bytes(tmp_path):
    history = FederationHistory()
    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"])
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, PLAN.network)
    answer = lambda node, msg: _constant_reply(msg, 1.0 if node == 7 else 5.0, 1 if node == 7 else 3)  # noqa: E731
    answer.nodes = [7, 8]
    messages, _, arrays, metrics = drive_round(strategy, 1, ArrayRecord(model.state_dict()), ConfigRecord(), answer)
    for a in arrays.values():
        np.testing.assert_allclose(a.numpy(), (1.0 * 1 + 5.0 * 3) / 4)
    entry = history.rounds[0]
    sent = ArrayRecord(model.state_dict()).count_bytes()
    assert entry.bytes_down_per_site == {"7": sent, "8": sent} and entry.bytes_down == 2 * sent
    assert set(entry.bytes_up_per_site) == {"7", "8"} and entry.bytes_up > 0
    assert entry.sites == 2 and entry.failures == 0 and entry.loss == pytest.approx(4.0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_step_from_the_global_model(tmp_path, name):
    history = FederationHistory()
    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"], strategy=name, fedopt={"eta": 0.01})
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, PLAN.network)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    answer = lambda node, msg: _constant_reply(msg, 0.0, 1)  # noqa: E731 - every site moved every weight to 0
    answer.nodes = [1, 2]
    _, _, arrays, _ = drive_round(strategy, 1, ArrayRecord(model.state_dict()), ConfigRecord(), answer)
    for k, a in arrays.items():
        step = a.numpy() - glob[k]
        big = np.abs(glob[k]) > 1e-2
        # An adaptive server step: towards the sites' average (0), bounded by about eta, not a jump to it.
        assert np.all(np.sign(step[big]) == -np.sign(glob[k][big]))
        assert np.abs(step).max() < 0.05
    assert history.rounds[0].sites == 2


def test_float16_transfer_halves_upload_and_server_averages_in_float32(tmp_path):
    _, sites = two_sites(tmp_path)
    history = FederationHistory()
    cfg = fed_config(tmp_path, [tmp_path / "site_0", tmp_path / "site_1"], transfer_dtype="float16")
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, PLAN.network)
    record = train_config_record(cfg, LABELS, cfg.plan)
    sent = {}  # what each site put on the wire (the server converts replies in place when aggregating)

    def answer(node, msg):
        out = sites(node, msg)
        sent[node] = {k: a.numpy().copy() for k, a in out.content["arrays"].items()}
        return out

    answer.nodes = sites.nodes
    _, _, arrays, _ = drive_round(strategy, 1, ArrayRecord(model.state_dict()), record, answer)
    assert all(a.dtype == np.float16 for s in sent.values() for a in s.values())
    assert all(a.dtype == "float32" for a in arrays.values())
    entry = history.rounds[0]
    assert entry.transfer_dtypes == ["float16"]
    for node in ("101", "102"):
        assert entry.bytes_up_per_site[node] < 0.65 * entry.bytes_down_per_site[node]
    # The average is the float32 average of the float16 values, weighted 1:2 (site sizes).
    for k, a in arrays.items():
        ups = [sent[node][k].astype(np.float32) for node in (101, 102)]
        np.testing.assert_allclose(a.numpy(), (ups[0] * 1 + ups[1] * 2) / 3, rtol=1e-6, atol=1e-7)


def test_fedbn_norm_layers_stay_at_each_site(tmp_path):
    _, sites = two_sites(tmp_path)
    history = FederationHistory()
    cfg = fed_config(tmp_path, [tmp_path / "site_0", tmp_path / "site_1"], strategy="fedbn")
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, cfg.plan.network)
    norm = set(norm_state_keys(model))
    record = train_config_record(cfg, LABELS, cfg.plan)
    arrays = ArrayRecord(model.state_dict())
    saved = {}
    for rnd in (1, 2):
        messages, replies, arrays, _ = drive_round(strategy, rnd, arrays, record, sites)
        for m in messages:  # the server does not send norm layers ...
            assert not norm & set(m.content["arrays"].keys())
        for r in replies:  # ... and no site sends its own
            assert not norm & set(r.content["arrays"].keys())
            assert set(r.content["arrays"].keys()) == set(model.state_dict()) - norm
        # The global model keeps every key (checkpointable); its norm layers stay at their init.
        state = arrays.to_torch_state_dict()
        assert set(state) == set(model.state_dict())
        for k in norm:
            torch.testing.assert_close(state[k], model.state_dict()[k])
        # Each site kept its own, trained norm layers on its disk, and round 2 started from them.
        for node, rt in sites.runtimes.items():
            ckpt = torch.load(local_norm_path(rt), weights_only=True)
            assert ckpt["run"] == 1 and ckpt["round"] == rnd and set(ckpt["state"]) == norm
            if rnd == 2:
                moved = [k for k in norm if not torch.equal(ckpt["state"][k], saved[node][k])]
                assert moved  # trained further from the round-1 values (restored, then updated)
            saved[node] = ckpt["state"]
    differs = [k for k in norm if not torch.allclose(saved[101][k], saved[102][k])]
    assert differs, "both sites ended with identical norm layers"
    assert history.rounds[1].bytes_down < 2 * ArrayRecord(model.state_dict()).count_bytes()


def test_fedbn_round_two_restores_the_sites_norm_layers(tmp_path, monkeypatch):
    """Round 2 of a FedBN site starts from the norm layers it saved, not from the init or the server's."""
    import fadal.federated.site_task as site_task

    _, sites = two_sites(tmp_path)
    cfg = fed_config(tmp_path, [tmp_path / "site_0", tmp_path / "site_1"], strategy="fedbn")
    strategy = build_strategy(cfg, 2, FederationHistory())
    model = build_network(3, cfg.plan.network)
    record = train_config_record(cfg, LABELS, cfg.plan)
    _, _, arrays, _ = drive_round(strategy, 1, ArrayRecord(model.state_dict()), record, sites)
    round1 = {n: torch.load(local_norm_path(rt), weights_only=True)["state"] for n, rt in sites.runtimes.items()}
    seen, current = {}, []
    real = site_task.fit

    def spy(model, *args, **kwargs):
        seen[current[-1]] = {k: v.clone() for k, v in model.state_dict().items() if k in round1[101]}
        return real(model, *args, **kwargs)

    def answer(node, msg):
        current.append(node)
        return sites(node, msg)

    answer.nodes = sites.nodes
    monkeypatch.setattr(site_task, "fit", spy)
    drive_round(strategy, 2, arrays, record, answer)
    assert set(seen) == {101, 102}
    for node in sites.nodes:
        for k, v in round1[node].items():
            torch.testing.assert_close(seen[node][k], v)
    # Evaluation (even in round 1) scores the model with the site's latest norm layers.
    msg = Message(RecordDict({"arrays": strategy._shared(arrays), "config": record}), dst_node_id=101,
                  message_type="evaluate")
    record["server-round"] = 1
    evaluated = site_task.model_from_message(msg, 3, cfg.plan, sites.runtimes[101], site_task.round_options(msg),
                                       for_training=False).state_dict()
    latest = torch.load(local_norm_path(sites.runtimes[101]), weights_only=True)["state"]
    for k, v in latest.items():
        torch.testing.assert_close(evaluated[k], v)


def test_federated_dice_averages_each_organ_over_the_sites_that_scored_it(tmp_path):
    """A site that never drew organB has no Dice for it: organB is averaged over the others."""
    history = FederationHistory()
    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"])
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, PLAN.network)
    messages = list(strategy.configure_evaluate(1, ArrayRecord(model.state_dict()), ConfigRecord(), FakeGrid([1, 2])))
    scores = {1: {"num-examples": 1, "dice-mean": 0.5, "dice-organA": 0.5},
              2: {"num-examples": 3, "dice-mean": 0.7, "dice-organA": 0.9, "dice-organB": 0.5}}
    replies = [Message(RecordDict({"metrics": MetricRecord(scores[m.metadata.dst_node_id])}), reply_to=m)
               for m in messages]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["dice-organA"] == pytest.approx((0.5 + 3 * 0.9) / 4)
    assert metrics["dice-organB"] == pytest.approx(0.5)
    assert history.rounds[0].dice == {"mean": pytest.approx(0.65), "organA": pytest.approx(0.8),
                                            "organB": pytest.approx(0.5)}


def test_server_learning_rate_and_momentum_step_the_global_model_as_fedavgm(tmp_path):
    """server_lr 2: the global model moves twice the averaged update; momentum carries the last step on;
    the momentum survives a restart through the strategy state file."""
    from fadal.federated.rounds import load_strategy_state, save_strategy_state

    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"], server_lr=2.0, server_momentum=0.5)
    strategy = build_strategy(cfg, 2, FederationHistory())
    model = build_network(3, PLAN.network)
    glob = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    answer = lambda node, msg: _constant_reply(msg, 1.0 if node == 1 else 3.0, 1)  # noqa: E731 - average 2.0
    answer.nodes = [1, 2]
    _, _, first, _ = drive_round(strategy, 1, ArrayRecord(model.state_dict()), ConfigRecord(), answer)
    for k, a in first.items():  # w - 2 * (w - 2) = 4 - w
        np.testing.assert_allclose(a.numpy(), 4.0 - glob[k], rtol=1e-5, atol=1e-5)
    save_strategy_state(strategy, tmp_path / "server_state.pt", 1)
    restarted = build_strategy(cfg, 2, FederationHistory())
    load_strategy_state(restarted, tmp_path / "server_state.pt", 1)
    _, _, second, _ = drive_round(restarted, 2, first, ConfigRecord(), answer)
    for k, a in second.items():  # pseudo-gradient (4 - w) - 2 = 2 - w, momentum 0.5 x (w - 2) + (2 - w) = (2 - w) / 2
        w1 = 4.0 - glob[k]
        np.testing.assert_allclose(a.numpy(), w1 - 2.0 * (0.5 * (glob[k] - 2.0) + (w1 - 2.0)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [{"strategy": "fedadam"}, {"secure_aggregation": True}])
def test_server_learning_rate_is_refused_where_the_server_does_not_average_itself(tmp_path, extra):
    with pytest.raises(ValueError, match="server_lr"):
        fed_config(tmp_path, [tmp_path / "a", tmp_path / "b"], server_lr=2.0, **extra)


def test_cyclic_trains_one_site_per_round_in_turn_and_takes_its_model(tmp_path):
    cfg = fed_config(tmp_path, [tmp_path / "a", tmp_path / "b", tmp_path / "c"], strategy="cyclic")
    history = FederationHistory()
    strategy = build_strategy(cfg, 3, history)
    model = build_network(3, PLAN.network)
    answer = lambda node, msg: _constant_reply(msg, float(node), 5)  # noqa: E731 - the site's id as every weight
    answer.nodes = [30, 10, 20]
    arrays = ArrayRecord(model.state_dict())
    trained = []
    for rnd in range(1, 5):
        messages, _, arrays, _ = drive_round(strategy, rnd, arrays, ConfigRecord(), answer)
        assert len(messages) == 1
        trained.append(messages[0].metadata.dst_node_id)
        assert all(np.all(a.numpy() == trained[-1]) for a in arrays.values())  # that site's model, not a mean
    assert trained == [10, 20, 30, 10]
    assert [r.sites for r in history.rounds] == [1, 1, 1, 1]
    evaluate = list(strategy.configure_evaluate(4, arrays, ConfigRecord(), FakeGrid([30, 10, 20])))
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [10, 20, 30]  # every site scores the model


@pytest.mark.parametrize("cyclic, every, expected", [
    (False, 5, {"a": [6], "b": [6], "c": [6]}),              # every site every round: rounds K+1, 2K+1
    (False, 3, {"a": [4, 7, 10], "b": [4, 7, 10], "c": [4, 7, 10]}),
    (True, 15, {"a": [16], "b": [17], "c": [18]}),           # one site per round: each refines once, when next asked
    (True, 9, {"a": [10, 19, 28], "b": [11, 20, 29], "c": [12, 21, 30]}),
])
def test_selftrain_every_counts_rounds_since_the_sites_own_refinement(cyclic, every, expected):
    from fadal.federated.site_amplification import is_refinement_round

    sites = ["a", "b", "c"]
    last = {s: 1 for s in sites}
    refined: dict[str, list[int]] = {s: [] for s in sites}
    for rnd in range(1, 31 if cyclic else 11):
        for s in ([sites[(rnd - 1) % 3]] if cyclic else sites):
            if is_refinement_round(rnd, every, last[s]):
                refined[s].append(rnd)
                last[s] = rnd
    assert refined == expected
