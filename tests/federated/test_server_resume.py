"""The ServerApp's round loop without any Flower process: resume and drop-out tolerance.

A stand-in Grid delivers each message to a site's ClientApp code in this process (or answers for a
dead site with the error reply a SuperLink sends), so these run in seconds; the same behaviour
with real SuperLink/SuperNode processes is tested in tests/integration/test_deployment.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Error, Message, MessageType
from flwr.serverapp import Grid

from fadal_testing import LABELS, write_site
from fadal.config import FederationConfig, SiteSpec, TrainConfig
from fadal_testing import tiny_plan
from fadal.federated.site_task import SiteRuntime, local_evaluate, local_train
from fadal.federated.server_app import run_federation
from fadal.records import FederationHistory


class LocalGrid(Grid):
    """Node ``i`` is ``sites[i]``; nodes in ``dead`` answer like a SuperNode that vanished, nodes in
    ``silent`` not at all (a reply lost with its connection); ``pages`` keeps ``out/report.html`` as each
    train round begins (the live page of the rounds before)."""

    def __init__(self, sites: list[SiteRuntime], dead: tuple[int, ...] = (), silent: tuple[int, ...] = (),
                 out=None) -> None:
        self.sites, self.dead, self.silent, self.sent = sites, set(dead), set(silent), 0
        self.out, self.pages = out, []

    def get_node_ids(self):
        return list(range(len(self.sites)))

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        if self.out is not None and messages and messages[0].metadata.message_type == MessageType.TRAIN:
            page = self.out / "report.html"
            self.pages.append(page.read_text() if page.exists() else None)
        for msg in messages:
            self.sent += 1
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.dead:
                replies.append(Message(error=Error(code=0, reason="node_unavail"), reply_to=msg))
            elif msg.metadata.message_type == MessageType.TRAIN:
                replies.append(local_train(msg, self.sites[node]))
            else:
                replies.append(local_evaluate(msg, self.sites[node]))
        return replies

    # Not used by the round loop.
    def set_run(self, run):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError


def _setup(tmp_path, n_sites: int, **overrides) -> tuple[FederationConfig, list[SiteRuntime]]:
    paths = [write_site(tmp_path / f"site_{k}", n_labeled=1, n_unlabeled=0, n_test=1) for k in range(n_sites)]
    cfg = FederationConfig(
        sites=[SiteSpec(name=p.name, data=p) for p in paths], rounds=1, evaluate_every=0,
        train=TrainConfig(num_threads=1), plan=tiny_plan((4, 8), spacing_mm=4.0),
        out=tmp_path / "run", **overrides,
    )
    return cfg, [SiteRuntime(p.name, p, None, False, tmp_path / "cache" / p.name) for p in paths]


def _round(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["round"]


def test_restarted_server_continues_after_the_last_finished_round(tmp_path):
    cfg, sites = _setup(tmp_path, 2)
    run_federation(LocalGrid(sites), cfg, LABELS, 2)  # "crashes" after round 1 of 3
    first = (cfg.out / "checkpoints" / "round_001.pt").stat().st_mtime_ns

    grid = LocalGrid(sites)
    history = run_federation(grid, cfg.model_copy(update={"rounds": 3}), LABELS, 2)
    assert [r.round for r in history.rounds] == [1, 2, 3]
    assert history.resumed_after == [1]
    assert grid.sent == 2 * 2  # rounds 2 and 3 only
    assert (cfg.out / "checkpoints" / "round_001.pt").stat().st_mtime_ns == first
    assert _round(cfg.out / "global_model.pt") == 3
    assert FederationHistory.model_validate_json((cfg.out / "history.json").read_text()) == history

    # Finished runs are not redone; resume=false starts over.
    grid = LocalGrid(sites)
    run_federation(grid, cfg.model_copy(update={"rounds": 3}), LABELS, 2)
    assert grid.sent == 0
    history = run_federation(LocalGrid(sites), cfg.model_copy(update={"resume": False}), LABELS, 2)
    assert [r.round for r in history.rounds] == [1] and history.resumed_after == []
    assert _round(cfg.out / "global_model.pt") == 1


def test_a_round_counts_with_min_sites_answers_and_stops_below(tmp_path):
    cfg, sites = _setup(tmp_path, 3, min_sites=2)
    history = run_federation(LocalGrid(sites, dead=(2,)), cfg, LABELS, 3)
    (entry,) = history.rounds
    assert (entry.sampled, entry.sites, entry.failures) == (3, 2, 1)
    assert _round(cfg.out / "global_model.pt") == 1

    strict = cfg.model_copy(update={"min_sites": 0, "rounds": 2})  # 0 = all three
    with pytest.raises(RuntimeError, match="2 of 3 sites answered"):
        run_federation(LocalGrid(sites, dead=(2,)), strict, LABELS, 3)
    assert _round(cfg.out / "global_model.pt") == 1  # round 2 was not written
    assert not (cfg.out / "checkpoints" / "round_002.pt").exists()


def test_server_state_is_plain_data_loaded_with_weights_only(tmp_path):
    """FedAdam's moments and the DP accountant survive a restart through ``weights_only=True``
    (no pickled objects: a tampered state file cannot run code on the coordinator)."""
    import numpy as np

    from fadal.federated.rounds import load_strategy_state, save_strategy_state
    from fadal.federated.strategies import build_strategy

    cfg = FederationConfig(sites=[SiteSpec(name="a", data=tmp_path)], strategy="fedadam", dp_clip=1.0,
                           plan=tiny_plan(), out=tmp_path / "run")
    strategy = build_strategy(cfg, 1, {}, num_sites=2)
    strategy.m_t = {"w": np.ones((2, 3), np.float32)}
    strategy.v_t = {"w": np.full((2, 3), 2.0, np.float32)}
    strategy.privacy.record([5, 6])
    strategy.privacy.record([5])
    path = tmp_path / "server_state.pt"
    save_strategy_state(strategy, path, 4)
    assert torch.load(path, weights_only=True)["round"] == 4
    fresh = build_strategy(cfg, 1, {}, num_sites=2)
    load_strategy_state(fresh, path, 4)
    np.testing.assert_array_equal(fresh.m_t["w"], strategy.m_t["w"])
    np.testing.assert_array_equal(fresh.v_t["w"], strategy.v_t["w"])
    assert fresh.privacy.releases == {5: 2, 6: 1} and fresh.privacy.epsilon() == strategy.privacy.epsilon()
    stale = build_strategy(cfg, 1, {}, num_sites=2)
    load_strategy_state(stale, path, 3)  # another round's state: starts afresh
    assert stale.m_t is None and stale.privacy.releases == {}


def test_the_live_page_shows_each_sites_status_after_every_round(tmp_path):
    """report.html is rewritten after every round: the page of round 1 of 2 reloads itself and says which
    site answered, failed or never replied; the finished page stops reloading; a stopped run says why."""
    cfg, sites = _setup(tmp_path, 4, min_sites=2)
    cfg = cfg.model_copy(update={"rounds": 2})
    grid = LocalGrid(sites, dead=(2,), silent=(3,), out=cfg.out)
    history = run_federation(grid, cfg, LABELS, 4)
    assert history.rounds[0].site_status == {"0": "answered", "1": "answered", "2": "failed", "3": "no reply"}
    assert grid.pages[0] is None  # nothing before round 1
    mid = grid.pages[1]
    assert '<meta http-equiv="refresh"' in mid and 'data-run-state="running"' in mid
    assert "Running: 1 of 2 rounds done" in mid
    for status in ("answered", "failed", "no reply"):
        assert f"<td>{status}</td>" in mid
    assert "1 of 1" in mid  # site 0 answered the one round that asked it
    final = (cfg.out / "report.html").read_text()
    assert 'data-run-state="finished"' in final and "http-equiv" not in final
    assert "Finished: 2 of 2 rounds done" in (cfg.out / "report.md").read_text()

    strict = cfg.model_copy(update={"min_sites": 0, "rounds": 3, "out": tmp_path / "strict"})
    with pytest.raises(RuntimeError, match="2 of 4 sites answered"):
        run_federation(LocalGrid(sites, dead=(2,), silent=(3,)), strict, LABELS, 4)
    stopped = (strict.out / "report.html").read_text()
    assert 'data-run-state="stopped"' in stopped and "2 of 4 sites answered" in stopped
