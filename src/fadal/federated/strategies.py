"""Aggregation strategies: Flower's own, with the same per-round accounting for every one of them.

* ``fedavg``: :class:`flwr.serverapp.strategy.FedAvg`, as Flower's :class:`FedAvgM` when ``server_lr`` or
  ``server_momentum`` is set (the global model moves by server_lr x the averaged update).
* ``fedprox``: FedAvg on the server; sites add the proximal term (``proximal-mu`` in the train config).
* ``fedadam`` / ``fedyogi``: Flower's server-side adaptive optimisers (:class:`FedAdam`, :class:`FedYogi`).
* ``cyclic``: cyclic weight transfer (Chang et al., JAMIA 2018): each round one site, in turn, trains the
  global model and the server takes it as it comes back (nothing is averaged). Its rounds are sequential
  steps, as in pooled training; the sites do not train at the same time.
* ``fedbn``: FedAvg over everything except the normalisation layers, which never leave the site
  (the server does not send them either; see :func:`fadal.federated.site_task.local_train`).

Every strategy averages with weights ``num-examples``: the number of training volumes a site used,
amplified ones included, so a site that amplified its few labels counts for what it trained on.

:class:`RecordingMixin` fills one :class:`~fadal.records.RoundEntry` per round of the run's
:class:`~fadal.records.FederationHistory`: sites, failures, mean
training loss, bytes down (what :meth:`configure_train` sent each site) and up (what each site
sent, as it came over the wire), per-site training seconds, federated Dice and, with client-side
differential privacy, the cumulative epsilon (accounted in :mod:`fadal.federated.privacy`). It also undoes a site's float16 transfer before
aggregation, so averaging and server optimisers always run in float32.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fadal.config import FederationConfig
from fadal.federated.privacy import SitePrivacy
from fadal.records import FederationHistory, Plan


def to_float32(record: ArrayRecord) -> ArrayRecord:
    """Undo a float16 transfer: the server averages (and optimises) in float32."""
    if all(a.dtype != "float16" for a in record.values()):
        return record
    return ArrayRecord({k: Array(a.numpy().astype(np.float32)) if a.dtype == "float16" else a
                        for k, a in record.items()})


class RecordingMixin:
    """Put first in the bases of any Flower Message-API strategy (``class X(RecordingMixin, FedAvg)``).

    ``local_keys``: state-dict keys that stay at the sites (FedBN): never sent to a site, not
    expected back, and kept at their initial values in the global model the server checkpoints.
    """

    def __init__(self, history: FederationHistory, evaluate_every: int = 1, num_rounds: int = 0,
                 local_keys: Sequence[str] = (), privacy: SitePrivacy | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.evaluate_every = evaluate_every
        self.num_rounds = num_rounds
        self.local_keys = frozenset(local_keys)
        self.privacy = privacy
        self._global: ArrayRecord | None = None

    # -- helpers
    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: a for k, a in arrays.items() if k not in self.local_keys})

    @staticmethod
    def _bytes_per_node(messages: Sequence[Message], node_of) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in messages:
            if m.has_content() and "arrays" in m.content:
                node = str(node_of(m))
                out[node] = out.get(node, 0) + int(m.content["arrays"].count_bytes())
        return out

    # -- Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        self._global = arrays
        messages = list(super().configure_train(server_round, self._shared(arrays), config, grid))
        down = self._bytes_per_node(messages, lambda m: m.metadata.dst_node_id)
        entry = self.history.entry(server_round)
        entry.bytes_down = sum(down.values())
        entry.bytes_down_per_site = down
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid):
        """Federated evaluation every ``evaluate_every`` rounds and after the last one."""
        due = self.evaluate_every > 0 and (server_round % self.evaluate_every == 0 or server_round == self.num_rounds)
        return list(super().configure_evaluate(server_round, self._shared(arrays), config, grid)) if due else []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [m for m in replies if m.has_content()]
        up = self._bytes_per_node(ok, lambda m: m.metadata.src_node_id)  # as sent (float16 if so)
        dtypes = sorted({a.dtype for m in ok if "arrays" in m.content for a in m.content["arrays"].values()})
        for m in ok:
            if "arrays" in m.content:
                m.content["arrays"] = to_float32(m.content["arrays"])
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.local_keys and self._global is not None:
            merged = {k: (arrays[k] if k in arrays else a) for k, a in self._global.items()}
            arrays = ArrayRecord(merged)
        entry = self.history.entry(server_round)
        entry.sites = len(ok)
        entry.failures = len(replies) - len(ok)
        entry.bytes_up = sum(up.values())
        entry.bytes_up_per_site = up
        entry.transfer_dtypes = dtypes
        seconds = {str(m.metadata.src_node_id): float(m.content["metrics"].get("train-seconds", 0.0)) for m in ok}
        client = {str(m.metadata.src_node_id): float(m.content["metrics"].get("client-seconds", 0.0)) for m in ok}
        if metrics is not None:
            entry.loss = float(metrics.get("train-loss", float("nan")))
            entry.train_seconds_max = max(seconds.values(), default=0.0)
            entry.train_seconds_sum = sum(seconds.values())
            entry.train_seconds_per_site = seconds
            entry.client_seconds_sum = sum(client.values())
            entry.client_seconds_per_site = client
            entry.startup_seconds_per_site = {str(m.metadata.src_node_id): float(
                m.content["metrics"].get("startup-seconds", 0.0)) for m in ok}
        if self.privacy is not None:
            entry.epsilon = self.privacy.record(m.metadata.src_node_id for m in ok)
            self.history.privacy = self.privacy.summary()
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of each metric over the sites that report it.

        Flower's default requires every site to send the same keys; a site that never drew an organ
        has no Dice for it, so each organ is averaged over the sites that scored it (weights
        ``num-examples``: the site's held-out cases)."""
        ok = [m for m in replies if m.has_content() and not m.has_error() and "metrics" in m.content]
        if not ok:
            return None
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for m in ok:
            rec = m.content["metrics"]
            w = float(rec.get(self.weighted_by_key, 1.0))
            for k, v in rec.items():
                if k == self.weighted_by_key or not isinstance(v, (int, float)):
                    continue
                sums[k] = sums.get(k, 0.0) + w * float(v)
                weights[k] = weights.get(k, 0.0) + w
        metrics = MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})
        entry = self.history.entry(server_round)
        entry.dice = {k[len("dice-"):]: float(v) for k, v in metrics.items() if k.startswith("dice-")}
        entry.eval_sites = len(ok)
        return metrics


class RecordingFedAvg(RecordingMixin, FedAvgM):
    """FedAvg (also the server side of FedProx and FedBN) with per-round accounting; Flower's FedAvgM,
    which is plain FedAvg at server_learning_rate 1 and server_momentum 0."""


class OneSite:
    """The grid as one site's strategy call sees it: only that node is connected (a view, nothing else)."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id

    def get_node_ids(self):
        return [self.node_id]


class RecordingCyclic(RecordingMixin, FedAvg):
    """Cyclic weight transfer with per-round accounting: round r trains at the r-th site in node-id order
    (round robin); the mean of one reply is that reply. Evaluation asks every site, as for FedAvg."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            return []
        return super().configure_train(server_round, arrays, config, OneSite(nodes[(server_round - 1) % len(nodes)]))


class RecordingFedAdam(RecordingMixin, FedAdam):
    """Flower's FedAdam with per-round accounting."""


class RecordingFedYogi(RecordingMixin, FedYogi):
    """Flower's FedYogi with per-round accounting."""


def local_state_keys(cfg: FederationConfig, plan: Plan | None) -> list[str]:
    """Keys that stay at the sites under ``fedbn``: the network's normalisation layers."""
    if cfg.strategy != "fedbn":
        return []
    from fadal.model.net import build_network, norm_state_keys

    if plan is None:
        raise ValueError("strategy 'fedbn' needs the run's plan to know the network's normalisation layers")
    keys = norm_state_keys(build_network(2, plan.network))  # norm layers do not depend on the class count
    if not keys:
        raise ValueError(f"strategy 'fedbn' needs normalisation layers with parameters; plan.network.norm="
                         f"{plan.network.norm!r} has none")
    return keys


def build_strategy(cfg: FederationConfig, min_sites: int, history: FederationHistory, num_sites: int | None = None,
                   plan: Plan | None = None) -> FedAvg:
    """The configured strategy; ``plan`` (default ``cfg.plan``) fixes the network FedBN keeps layers of."""
    common = dict(
        evaluate_every=cfg.evaluate_every,
        num_rounds=cfg.rounds,
        local_keys=local_state_keys(cfg, plan or cfg.plan),
        privacy=(SitePrivacy(cfg.dp_clip, cfg.dp_noise_multiplier, cfg.dp_delta, num_sites or len(cfg.sites))
                 if cfg.dp_clip is not None else None),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites,
        min_available_nodes=min_sites,
    )
    if cfg.strategy == "cyclic":
        return RecordingCyclic(history, **{**common, "min_train_nodes": 1, "min_available_nodes": 1})
    if cfg.strategy in ("fedavg", "fedprox", "fedbn"):
        return RecordingFedAvg(history, **common, server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    opt = dict(eta=cfg.fedopt.eta, eta_l=cfg.train.lr, beta_1=cfg.fedopt.beta_1, beta_2=cfg.fedopt.beta_2,
               tau=cfg.fedopt.tau)
    if cfg.strategy == "fedadam":
        return RecordingFedAdam(history, **common, **opt)
    if cfg.strategy == "fedyogi":
        return RecordingFedYogi(history, **common, **opt)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")
