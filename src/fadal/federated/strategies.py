"""Aggregation strategies: Flower's own, with per-round accounting for the report.

FedAvg weights each site by ``num-examples``: the number of training volumes it used, amplified
ones included, so a site that amplified its few labels counts for what it trained on.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fadal.config import FederationConfig


class RecordingFedAvg(FedAvg):
    """FedAvg that appends per-round metrics and bytes on the wire to ``history["rounds"]``."""

    def __init__(self, history: dict, evaluate_every: int = 1, num_rounds: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.evaluate_every = evaluate_every
        self.num_rounds = num_rounds

    def configure_evaluate(self, server_round: int, arrays, config, grid):
        """Federated evaluation every ``evaluate_every`` rounds and after the last one."""
        due = self.evaluate_every > 0 and (server_round % self.evaluate_every == 0 or server_round == self.num_rounds)
        return super().configure_evaluate(server_round, arrays, config, grid) if due else []

    def _entry(self, server_round: int) -> dict:
        rounds = self.history.setdefault("rounds", [])
        if not rounds or rounds[-1]["round"] != server_round:
            rounds.append({"round": server_round})
        return rounds[-1]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        entry = self._entry(server_round)
        ok = [m for m in replies if m.has_content()]
        entry["sites"] = len(ok)
        entry["failures"] = len(replies) - len(ok)
        entry["bytes_up"] = int(sum(m.content["arrays"].count_bytes() for m in ok if "arrays" in m.content))
        if metrics is not None:
            entry["loss"] = float(metrics.get("train-loss", float("nan")))
            entry["train_seconds_max"] = max(float(m.content["metrics"]["train-seconds"]) for m in ok)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            entry = self._entry(server_round)
            entry["dice"] = {k[len("dice-"):]: float(v) for k, v in metrics.items() if k.startswith("dice-")}
        return metrics


def build_strategy(cfg: FederationConfig, min_sites: int, history: dict) -> FedAvg:
    if cfg.strategy == "fedavg":
        return RecordingFedAvg(
            history,
            evaluate_every=cfg.evaluate_every,
            num_rounds=cfg.rounds,
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
    raise ValueError(f"unknown strategy {cfg.strategy!r}")
