"""A site's own record of the privacy it has spent, over every round of every run.

The coordinator's epsilon (``history.json``) covers one run and is computed by the party the noise
protects against; a hospital needs its own count. Every noised update the site sends is one
release (its ``dp-noise-multiplier`` and ``dp-clip``), appended to a JSON file in the site's local
state folder (mode 0600, atomic writes, a lock against two ClientApps at once). A release is
recorded *before* training starts, after checking that it fits the budget: a round that then fails
still counts (conservative), and two runs can never both spend the last of a budget.
Accounting as :mod:`fadal.federated.privacy` (replace-one adjacency, sensitivity 2 x clip).
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fadal.data.io import PRIVATE, private_dir, write_json
from fadal.errors import FadalInputError, SiteRefusal
from fadal.federated.privacy import ADJACENCY, composed_epsilon

LEDGER_VERSION = 1


class EpsilonLedger:
    """The releases recorded in ``path``; epsilon at ``delta`` over all of them."""

    def __init__(self, path: Path, delta: float) -> None:
        self.path = Path(path)
        self.delta = delta

    def releases(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != LEDGER_VERSION:
                raise ValueError(f"format {data.get('format')!r}, expected {LEDGER_VERSION}")
            return list(data["releases"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Never start afresh: that would forget the privacy already spent.
            raise FadalInputError(f"{self.path}: unreadable epsilon ledger ({err}); repair or move it") from err

    def epsilon(self, extra_noise_multipliers: tuple[float, ...] = ()) -> float:
        sigmas = [float(r["noise_multiplier"]) for r in self.releases()] + list(extra_noise_multipliers)
        return composed_epsilon(sigmas, self.delta)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.path.parent)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def spend(self, noise_multiplier: float, clip: float, run_id: int, server_round: int,
              budget: float | None) -> float:
        """Record one release (refused, and not recorded, if it would take epsilon above ``budget``);
        returns the site's epsilon with it."""
        with self._locked():
            releases = self.releases()
            eps = composed_epsilon([float(r["noise_multiplier"]) for r in releases] + [noise_multiplier], self.delta)
            if budget is not None and eps > budget:
                raise SiteRefusal("epsilon-budget", f"this release would bring the site's epsilon to {eps:.3g} "
                                  f"(delta {self.delta:g}) over its budget {budget:g} ({self.path})")
            releases.append({"run": int(run_id), "round": int(server_round), "noise_multiplier": float(noise_multiplier),
                             "clip": float(clip), "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            write_json({"format": LEDGER_VERSION, "adjacency": ADJACENCY, "delta": self.delta, "epsilon": eps,
                        "releases": releases}, self.path, mode=PRIVATE)
            return eps
