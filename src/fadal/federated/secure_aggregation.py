"""Optional secure aggregation: Flower's SecAgg+ protocol around the same local training.

Why a second path: in Flower 1.42 SecAgg+ exists only for the legacy API (``SecAggPlusWorkflow``
with a ``LegacyContext`` and a legacy strategy on the server, ``secaggplus_mod`` and ``FitRes``
replies on the site). The rest of FADAL uses the Message API, so this module translates at both ends:

* Server (:func:`run_secure_federation`): the same round loop as
  :func:`fadal.federated.server_app.run_federation` (resume, ``min_sites``, checkpoint and history
  every round, federated evaluation through the Message-API strategy), but each training round is
  one ``SecAggPlusWorkflow`` call. The server only receives masked integer vectors; after the
  unmask stage it holds the example-weighted mean of the sites' models and nothing else.
* Site (:func:`fadal.federated.secure_aggregation_site.secure_train`, a module of its own so that the
  ClientApp imports none of the server's code): the legacy ``FitIns`` is turned into the message
  :func:`fadal.federated.site_task.local_train` expects, and its reply (allow-listed metrics +
  arrays) into a ``FitRes``. ``secaggplus_mod`` (installed by ``secagg_when_asked``) then
  weights, quantises and masks the arrays and strips them from the reply; only the masked vector
  and the scalar metrics leave the site.

Quantisation: each value v of a site's model with n training examples is sent as
round((n / max_weight) * v) on 2**bits levels over [-clipping_range, clipping_range]; the error of
the aggregate is about max_weight / sum(n) * 2 * clipping_range / 2**bits per value.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore import log

from fadal.config import FederationConfig
from fadal.federated.planning import federation_plan
from fadal.federated.rounds import (ANSWERED, FAILED, evaluate_round, load_strategy_state, resume_point,
                                    save_round, train_config_record, write_live_page)
from fadal.federated.strategies import build_strategy
from fadal.model.engine import seed_everything
from fadal.model.net import build_network
from fadal.records import FederationHistory, RoundEntry


# --------------------------------------------------------------------------- server side
class SecureFedAvg(LegacyFedAvg):
    """Legacy FedAvg behind SecAgg+: every result it gets already carries the weighted mean (the
    workflow puts the unmasked aggregate into each ``FitRes``), so averaging them changes nothing;
    it records the round's sites, failures, mean training loss and training seconds."""

    def __init__(self, history: FederationHistory, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.last_sites: list[int] = []

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        entry = self.history.entry(server_round)
        entry.sites = len(results)
        entry.failures = len(failures)
        self.last_sites = [p.node_id for p, _ in results]
        # A failure is a (proxy, FitRes) with an error status or an exception without a site to name.
        entry.site_status = {**{str(p.node_id): ANSWERED for p, _ in results},
                             **{str(f[0].node_id): FAILED for f in failures if isinstance(f, tuple)}}
        if results:
            total = sum(r.num_examples for _, r in results)
            entry.loss = sum(r.num_examples * float(r.metrics.get("train-loss", np.nan)) for _, r in results) / total
            seconds = {str(p.node_id): float(r.metrics.get("train-seconds", 0.0)) for p, r in results}
            entry.train_seconds_max = max(seconds.values())
            entry.train_seconds_sum = sum(seconds.values())
            entry.train_seconds_per_site = seconds
        return aggregated


class MeteredGrid:
    """The grid the SecAgg+ workflow talks through, counting bytes per site in each direction
    (all four protocol stages: keys, shares, masked vectors, unmasking)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.up: dict[str, int] = {}
        self.down: dict[str, int] = {}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    @staticmethod
    def _bytes(record) -> int:
        if isinstance(record, ArrayRecord):
            return int(record.count_bytes())

        # Config/metric records by hand: Flower's count_bytes fails on empty strings and lists,
        # which the protocol sends (legacy status message, no dropped sites).
        def size(v) -> int:
            return sum(size(x) for x in v) if isinstance(v, list) else len(v) if isinstance(v, (str, bytes)) else 8

        return sum(len(k) + size(v) for k, v in record.items())

    @classmethod
    def _add(cls, counts: dict[str, int], node: int, msg: Message) -> None:
        size = sum(cls._bytes(r) for r in msg.content.values())
        counts[str(node)] = counts.get(str(node), 0) + size

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            self._add(self.down, m.metadata.dst_node_id, m)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_content():
                self._add(self.up, r.metadata.src_node_id, r)
        return replies

    def take(self, entry: RoundEntry) -> None:
        """Move this round's counts into its history entry."""
        entry.bytes_up, entry.bytes_up_per_site = sum(self.up.values()), self.up
        entry.bytes_down, entry.bytes_down_per_site = sum(self.down.values()), self.down
        self.up, self.down = {}, {}


def secagg_workflow(cfg: FederationConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow from the config (0 = defaults, see ``FederationConfig``)."""
    return SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares or 1.0,  # 1.0: every sampled site
        reconstruction_threshold=cfg.secagg_reconstruction_threshold or 2 / 3,
        max_weight=cfg.secagg_max_weight,
        clipping_range=cfg.secagg_clipping_range,
        quantization_range=2 ** cfg.secagg_quantization_bits,
        modulus_range=2 ** 32,
        timeout=cfg.round_timeout,
    )


def _to_state(record: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The legacy API's unnamed arrays back into the network's state dict (names, shapes, dtypes)."""
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    return {k: torch.from_numpy(np.asarray(a)).reshape(ref.shape).to(ref.dtype)
            for (k, ref), a in zip(reference.items(), arrays, strict=True)}


def run_secure_federation(grid: Grid, context: Context, cfg: FederationConfig, labels: dict[str, int],
                          num_sites: int) -> FederationHistory:
    """Rounds up to ``cfg.rounds`` with SecAgg+ training; checkpoints, history and resume as
    :func:`fadal.federated.server_app.run_federation`. A round that SecAgg+ had to abandon (too few
    sites or shares) or that fewer than ``min_sites`` sites finished stops the run with an error."""
    seed_everything(cfg.train.seed)
    out = Path(cfg.out)
    plan = federation_plan(grid, cfg, labels, num_sites)
    model = build_network(max(labels.values()) + 1, plan.network)
    min_sites = max(cfg.min_sites or num_sites, 2)
    done, history = resume_point(cfg, labels, model)
    history.config = cfg.model_dump(mode="json")
    history.secure_aggregation = {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow)",
                                     "num_shares": cfg.secagg_num_shares or "all sampled sites",
                                     "reconstruction_threshold": cfg.secagg_reconstruction_threshold or "2/3 of shares",
                                     "clipping_range": cfg.secagg_clipping_range, "max_weight": cfg.secagg_max_weight,
                                     "quantization_bits": cfg.secagg_quantization_bits}
    # The Message-API strategy only evaluates and keeps the DP accountant (its state resumes as usual).
    evaluator = build_strategy(cfg, min_sites, history, num_sites=num_sites, plan=plan)
    if done:
        load_strategy_state(evaluator, out / "checkpoints" / "server_state.pt", done)
        history.resumed_after.append(done)
        log(INFO, "Resuming %s after round %s of %s (secure aggregation)", out, done, cfg.rounds)
    record = train_config_record(cfg, labels, plan)
    fit_config = {**dict(record), "secagg-clipping-range": float(cfg.secagg_clipping_range),
                  "secagg-max-weight": float(cfg.secagg_max_weight)}
    strategy = SecureFedAvg(history, fraction_fit=cfg.fraction_train, fraction_evaluate=0.0,
                            min_fit_clients=min_sites, min_available_clients=min_sites,
                            on_fit_config_fn=lambda rnd: {**fit_config, "server-round": rnd})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(reference)
    round_config = ConfigRecord({WorkflowKey.START_TIME: time.time()})
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = round_config
    metered, workflow = MeteredGrid(grid), secagg_workflow(cfg)
    thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
    registered.wait()
    # The legacy strategy sizes its sample from the clients registered now: wait for every site.
    legacy.client_manager.wait_for(num_sites, timeout=int(cfg.join_timeout))
    try:
        for rnd in range(done + 1, cfg.rounds + 1):
            log(INFO, "[ROUND %s/%s] secure aggregation", rnd, cfg.rounds)
            t0 = time.perf_counter()
            round_config[WorkflowKey.CURRENT_ROUND] = rnd
            workflow(metered, legacy)
            entry = history.entry(rnd)
            metered.take(entry)
            if entry.sites is None or entry.sites < min_sites or entry.loss is None:
                raise RuntimeError(f"round {rnd}: secure aggregation did not finish with min_sites={min_sites} sites "
                                   f"({entry.sites or 0} did; see the sites' logs); {out} holds round {rnd - 1}: "
                                   "submit the run again to resume")
            entry.sampled = entry.sites + entry.failures
            if evaluator.privacy is not None:
                entry.epsilon = evaluator.privacy.record(strategy.last_sites)
                history.privacy = evaluator.privacy.summary()
            model.load_state_dict(_to_state(legacy.state.array_records[MAIN_PARAMS_RECORD], reference))
            # The unmasked mean comes back as float64: the next round sends the network's own dtypes.
            legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(model.state_dict())
            evaluate_round(evaluator, grid, rnd, ArrayRecord(model.state_dict()), record, cfg.round_timeout)
            entry.seconds = time.perf_counter() - t0
            save_round(model, cfg, plan, labels, history, rnd, evaluator)
            write_live_page(cfg, history, "finished" if rnd == cfg.rounds else "running")
    except Exception as err:
        write_live_page(cfg, history, "stopped", str(err))
        raise
    finally:
        stop.set()
        thread.join()
    return history
