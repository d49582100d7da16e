"""Aggregation strategies: Flower's own, with the same per-round accounting for every one of them.

* ``fedavg``: :class:`flwr.serverapp.strategy.FedAvg`.
* ``fedprox``: FedAvg on the server; sites add the proximal term (``proximal-mu`` in the train config).
* ``fedadam`` / ``fedyogi``: Flower's server-side adaptive optimisers (:class:`FedAdam`, :class:`FedYogi`).
* ``fedbn``: FedAvg over everything except the normalisation layers, which never leave the site
  (the server does not send them either; see :func:`fadal.federated.site_task.local_train`).

Every strategy averages with weights ``num-examples``: the number of training volumes a site used,
amplified ones included, so a site that amplified its few labels counts for what it trained on.

:class:`RecordingMixin` fills one :class:`~fadal.records.RoundEntry` per round of the run's
:class:`~fadal.records.FederationHistory`: sites, failures, mean
training loss, bytes down (what :meth:`configure_train` sent each site) and up (what each site
sent, as it came over the wire), per-site training seconds, federated Dice and, with client-side
differential privacy, the cumulative epsilon. It also undoes a site's float16 transfer before
aggregation, so averaging and server optimisers always run in float32.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from fadal.config import FederationConfig
from fadal.records import FederationHistory, Plan


# --------------------------------------------------------------------------- privacy accounting
def gaussian_rdp_epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, best order) of ``releases`` compositions of the Gaussian mechanism (sensitivity 1,
    noise ``noise_multiplier``), via Renyi DP: RDP(a) = releases * a / (2 sigma^2) (Mironov 2017),
    converted with the bound of Balle et al. 2020 (Thm 21), the conversion Opacus uses:
    eps = RDP(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1), minimised over orders a > 1."""
    if releases <= 0:
        return 0.0, float("nan")
    if noise_multiplier <= 0:
        return math.inf, float("nan")
    orders = np.concatenate([1.0 + np.logspace(-4, 0, 400), np.logspace(math.log10(2.0), 5, 3000)])
    rdp = releases * orders / (2.0 * noise_multiplier ** 2)
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    i = int(np.nanargmin(eps))
    return max(float(eps[i]), 0.0), float(orders[i])


class GaussianRdpAccountant:
    """Flower's ``PrivacyAccountant`` protocol for un-subsampled Gaussian releases, without the
    optional ``dp-accounting`` package (``flwr[dp]``) that Flower's own ``RdpAccountant`` needs."""

    def __init__(self, config: PrivacyConfig) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError("GaussianRdpAccountant accounts Gaussian releases without sampling amplification only")
        self._config = config
        self._events: list[tuple[GaussianPrivacyEvent, int]] = []

    @property
    def config(self) -> PrivacyConfig:
        return self._config

    @property
    def num_releases(self) -> int:
        return sum(n for _, n in self._events)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        self._events.append((event, int(count)))

    def get_epsilon(self, delta: float) -> float:
        return self.get_privacy_spent(delta).epsilon

    def get_delta(self, epsilon: float) -> float:  # pragma: no cover - protocol completeness
        lo, hi = 1e-300, 1.0
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.get_epsilon(min(mid, 0.999999)) > epsilon else (lo, mid)
        return hi

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        delta = self._config.target_delta if delta is None else delta
        if not self._events:
            return PrivacySpent(0.0, delta, 0, "rdp-gaussian", None)
        # All events share one closed form: the sum of rho = 1/(2 sigma^2) over releases.
        rho = sum(n / (2.0 * e.noise_multiplier ** 2) for e, n in self._events)
        eps, order = gaussian_rdp_epsilon(1.0 / math.sqrt(2.0 * rho), 1, delta)
        return PrivacySpent(eps, delta, self.num_releases, "rdp-gaussian", order)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        limit = max_epsilon if max_epsilon is not None else self._config.max_epsilon
        if limit is None:
            raise ValueError("max_epsilon must be given")
        probe = GaussianRdpAccountant(self._config)
        probe._events = [*self._events, (event, count)]
        return probe.get_epsilon(self._config.target_delta) > limit

    def state_dict(self) -> dict[str, object]:
        return {"events": [{"noise_multiplier": e.noise_multiplier, "sample_size": e.sample_size,
                            "population_size": e.population_size, "count": n} for e, n in self._events]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._events = [(GaussianPrivacyEvent(d["noise_multiplier"], d["sample_size"], d["population_size"]), d["count"])
                        for d in state["events"]]  # type: ignore[index,union-attr]


def make_accountant(num_sites: int, delta: float):
    """Flower's RDP accountant when its optional backend is installed, otherwise the closed form above.

    Neighbouring relation: add/remove one site's whole contribution (site-level DP, as DP-FedAvg);
    no sampling amplification, because the server picks the sites and sees who replied (it is the
    party the noise protects against), and each site adds the full noise to its own update."""
    config = PrivacyConfig(target_delta=delta, population_size=max(num_sites, 1),
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    try:
        from flwr.serverapp import RdpAccountant

        return RdpAccountant(config)
    except ImportError:
        return GaussianRdpAccountant(config)


class SitePrivacy:
    """Per-site accounting: each update a site sends is one Gaussian release (noise
    ``noise_multiplier`` x clip, sensitivity clip). The reported epsilon is the worst site's.

    Holds only counts (picklable: the server saves it with its state to resume a run); the
    accountant is rebuilt from them when epsilon is asked for."""

    def __init__(self, clip: float, noise_multiplier: float, delta: float, num_sites: int) -> None:
        self.clip, self.noise_multiplier, self.delta, self.num_sites = clip, noise_multiplier, delta, num_sites
        self.releases: dict[int, int] = {}

    def record(self, node_ids: Iterable[int]) -> float | None:
        for node in node_ids:
            self.releases[int(node)] = self.releases.get(int(node), 0) + 1
        return self.epsilon()

    def _accountant(self, releases: int):
        acc = make_accountant(self.num_sites, self.delta)
        if releases and self.noise_multiplier > 0:
            acc.compose(GaussianPrivacyEvent(self.noise_multiplier, 1, max(self.num_sites, 1)), releases)
        return acc

    def epsilon(self) -> float | None:
        """Worst site's cumulative epsilon at ``delta``; None = no guarantee (clipping without noise)."""
        worst = max(self.releases.values(), default=0)
        if worst == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return None
        return float(self._accountant(worst).get_epsilon(self.delta))

    def summary(self) -> dict:
        acc = self._accountant(0)
        return {
            "mechanism": "client-side Gaussian: update (local - global) clipped to L2 <= clip, + N(0, (noise_multiplier*clip)^2)",
            "neighbouring": "add/remove one site's contribution (site-level DP); no sampling amplification",
            "clip": self.clip, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
            "epsilon": self.epsilon(),
            "releases_per_site": {str(n): k for n, k in self.releases.items()},
            "accountant": type(acc).__module__ + "." + type(acc).__name__,
        }


# --------------------------------------------------------------------------- recording mixin
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


class RecordingFedAvg(RecordingMixin, FedAvg):
    """FedAvg (also the server side of FedProx and FedBN) with per-round accounting."""


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
    if cfg.strategy in ("fedavg", "fedprox", "fedbn"):
        return RecordingFedAvg(history, **common)
    opt = dict(eta=cfg.fedopt.eta, eta_l=cfg.train.lr, beta_1=cfg.fedopt.beta_1, beta_2=cfg.fedopt.beta_2,
               tau=cfg.fedopt.tau)
    if cfg.strategy == "fedadam":
        return RecordingFedAdam(history, **common, **opt)
    if cfg.strategy == "fedyogi":
        return RecordingFedYogi(history, **common, **opt)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")
