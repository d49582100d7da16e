"""Differential-privacy accounting of what sites send, for the server's history and each site's own ledger.

Mechanism (:func:`fadal.federated.site_task.privatise_update`): a site clips its update (local model -
received model, all floating-point tensors jointly) to L2 norm ``C`` = ``dp-clip`` and adds
N(0, (sigma C)^2) to every element, sigma = ``dp-noise-multiplier``. Each round's update is one release.

Adjacency: **replace-one, site level**. Two federations are neighbours when one site's *whole*
dataset is replaced by any other. The coordinator sees each site's update on its own (or, under
SecAgg+, only their sum: post-processing), so the protected unit is a site's dataset, and
replacing it can move the clipped update anywhere in the ball of radius C: two updates differ by
up to **2C**. The L2 sensitivity is therefore 2C and the Gaussian's effective noise multiplier
(noise std / sensitivity) is sigma C / 2C = **sigma / 2** (:func:`effective_noise_multiplier`).
(Add/remove adjacency would give sensitivity C, but removing a site removes its whole message,
which the coordinator sees; replace-one is the relation that fits a site's single update.)

No sampling amplification: the coordinator picks the sites and sees who replied. Scalar metrics:
under DP a site sends none that depend on its data (no loss, no Dice, no seconds; its weight
``num-examples`` is 1), so the noised update is the only release and nothing else needs accounting.

Epsilon: Renyi DP of the Gaussian mechanism, alpha / (2 z^2) per release of effective multiplier z
(Mironov 2017), composed additively over releases and converted to (epsilon, delta) with
Balle et al. 2020 (Thm 21). Flower's ``RdpAccountant`` (``flwr[dp]``) is used when installed.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, PrivacySpent, SamplingMethod

#: The update's L2 sensitivity in units of the clip norm under replace-one adjacency.
REPLACE_ONE_SENSITIVITY = 2.0
ADJACENCY = ("replace-one: one site's whole dataset replaced by any other (site-level DP); sensitivity 2 x clip "
             "of the clipped update; no sampling amplification")


def effective_noise_multiplier(noise_multiplier: float) -> float:
    """Noise std over the update's sensitivity: sigma C / (2 C) under replace-one adjacency."""
    return noise_multiplier / REPLACE_ONE_SENSITIVITY


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

    It is given events whose noise multiplier is already :func:`effective_noise_multiplier` (std over
    the replace-one sensitivity). Flower's config names a neighbouring relation only to pick how
    *sampling* amplifies; without sampling the Gaussian's RDP depends on std / sensitivity alone,
    and Flower accepts only ``ADD_OR_REMOVE_ONE`` with ``NO_AMPLIFICATION``, hence that label."""
    config = PrivacyConfig(target_delta=delta, population_size=max(num_sites, 1),
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    try:
        from flwr.serverapp import RdpAccountant

        return RdpAccountant(config)
    except ImportError:
        return GaussianRdpAccountant(config)


def composed_epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon at ``delta`` of one site's releases, each with its own ``dp-noise-multiplier`` (a site's
    ledger spans runs with different settings); inf if one had no noise."""
    rho = 0.0
    for sigma in noise_multipliers:
        if not sigma > 0:
            return math.inf
        rho += 1.0 / (2.0 * effective_noise_multiplier(sigma) ** 2)
    if rho == 0:
        return 0.0
    return gaussian_rdp_epsilon(1.0 / math.sqrt(2.0 * rho), 1, delta)[0]


class SitePrivacy:
    """The server's per-site accounting: each update a site sends is one release (noise
    ``noise_multiplier`` x clip, replace-one sensitivity 2 x clip). The reported epsilon is the worst site's.

    Holds only counts; :meth:`state_dict` is plain data (the server saves it with its state to resume a
    run and loads it with ``weights_only=True``)."""

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
            event = GaussianPrivacyEvent(effective_noise_multiplier(self.noise_multiplier), 1, max(self.num_sites, 1))
            acc.compose(event, releases)
        return acc

    def epsilon(self) -> float | None:
        """Worst site's cumulative epsilon at ``delta``; None = no guarantee (clipping without noise)."""
        worst = max(self.releases.values(), default=0)
        if worst == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return None
        return float(self._accountant(worst).get_epsilon(self.delta))

    def state_dict(self) -> dict:
        return {"clip": self.clip, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "num_sites": self.num_sites, "releases": {str(n): k for n, k in self.releases.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.releases = {int(n): int(k) for n, k in state["releases"].items()}

    def summary(self) -> dict:
        acc = self._accountant(0)
        return {
            "mechanism": "client-side Gaussian: update (local - global) clipped to L2 <= clip, + N(0, (noise_multiplier*clip)^2)",
            "neighbouring": ADJACENCY,
            "sensitivity": REPLACE_ONE_SENSITIVITY * self.clip,
            "clip": self.clip, "noise_multiplier": self.noise_multiplier, "delta": self.delta,
            "epsilon": self.epsilon(),
            "releases_per_site": {str(n): k for n, k in self.releases.items()},
            "accountant": type(acc).__module__ + "." + type(acc).__name__,
        }
