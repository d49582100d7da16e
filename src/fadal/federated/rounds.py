"""What both server loops (plain and SecAgg+) share: the train config a round sends, the resume point,
the strategy's state, and the round's checkpoints and history (a :class:`~fadal.records.FederationHistory`,
whose ``entry(round)`` is the round's :class:`~fadal.records.RoundEntry`)."""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from fadal.config import FederationConfig
from fadal.data.io import read_record, save_torch, write_record
from fadal.errors import FadalInputError
from fadal.model.infer import read_checkpoint, save_checkpoint
from fadal.records import FederationHistory, Plan

#: What :func:`site_status` records (the same words as :mod:`fadal.evaluate.tables` shows).
ANSWERED, FAILED, NO_REPLY = "answered", "failed", "no reply"


def train_config_record(cfg: FederationConfig, labels: dict[str, int], plan: Plan) -> ConfigRecord:
    """Everything a site needs to train the same network the same way (no data, no paths).

    Read by :func:`fadal.federated.site_task.local_train`: ``local-steps`` of this round within
    ``total-steps`` (the learning-rate schedule's length), the ``plan``, ``proximal-mu`` (FedProx term, 0 unless
    strategy 'fedprox'), ``local-norm`` (FedBN: keep normalisation layers at the site),
    ``transfer-dtype``, ``partial-label-mode``/``distill-*`` (ConDistFL) and ``dp-clip``/``dp-noise-multiplier``
    (client-side differential privacy; ``dp-clip`` 0 = off), ``synthesis`` (JSON, "" = off), ``selftrain-every``
    and ``selftrain`` (amplification at the sites: :mod:`fadal.federated.site_amplification`)."""
    return ConfigRecord({
        "local-steps": cfg.local_steps,
        "total-steps": cfg.local_steps * cfg.rounds,
        "train-config": cfg.train.model_dump_json(),
        "plan": plan.model_dump_json(),
        "labels": json.dumps(labels),
        "strategy": cfg.strategy,
        "proximal-mu": float(cfg.proximal_mu) if cfg.strategy == "fedprox" else 0.0,
        "local-norm": cfg.strategy == "fedbn",
        "transfer-dtype": cfg.transfer_dtype,
        "partial-label-mode": cfg.partial_label_mode,
        "distill-weight": float(cfg.distill_weight),
        "distill-temperature": float(cfg.distill_temperature),
        "dp-clip": float(cfg.dp_clip or 0.0),
        "dp-noise-multiplier": float(cfg.dp_noise_multiplier),
        "synthesis": cfg.synthesis.model_dump_json() if cfg.synthesis is not None else "",
        "selftrain-every": int(cfg.selftrain_every),
        "selftrain": cfg.selftrain.model_dump_json(exclude={"model", "train"}),
    })


def resume_point(cfg: FederationConfig, labels: dict[str, int], model: torch.nn.Module) -> tuple[int, FederationHistory]:
    """Last finished round of an earlier run in ``cfg.out`` (weights loaded into ``model``) and its
    history (round 0 and a new history when there is nothing to resume).

    ``global_model.pt`` is written last in each round, so its round is the one to continue from;
    history entries of later rounds (written just before a crash) are dropped and redone.
    """
    out = Path(cfg.out)
    ckpt_path, hist_path = out / "global_model.pt", out / "history.json"
    if not (cfg.resume and ckpt_path.exists() and hist_path.exists()):
        return 0, FederationHistory()
    ckpt = read_checkpoint(ckpt_path)
    try:
        if {k: int(v) for k, v in ckpt["labels"].items()} != labels:
            raise ValueError(f"labels {ckpt['labels']} differ from {labels}")
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError) as err:
        raise FadalInputError(f"{ckpt_path}: cannot resume this earlier run ({err}); use a new `out:` or "
                              "`resume: false`") from err
    done = int(ckpt["round"])
    history = read_history(hist_path)
    history.rounds = [r for r in history.rounds if r.round <= done]
    return done, history


#: Version of ``server_state.pt`` (plain tensors, numbers and dicts: loaded with ``weights_only=True``).
STRATEGY_STATE_VERSION = 2


def save_strategy_state(strategy, path: Path, server_round: int) -> None:
    """What must survive a restart: FedAdam/FedYogi moments, FedAvgM's momentum and the DP accountant's counts."""
    state: dict = {}
    for key in ("m_t", "v_t"):  # Flower keeps the moments as {name: numpy array}
        if getattr(strategy, key, None) is not None:
            state[key] = {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, key).items()}
    if getattr(strategy, "momentum_vector", None) is not None:  # FedAvgM: a list in the arrays' order
        state["momentum"] = [torch.from_numpy(np.array(v)) for v in strategy.momentum_vector]
    if getattr(strategy, "privacy", None) is not None:
        state["privacy"] = strategy.privacy.state_dict()
    if state:
        save_torch({"format": STRATEGY_STATE_VERSION, "round": server_round, **state}, path)


def load_strategy_state(strategy, path: Path, server_round: int) -> None:
    if not path.exists():
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STRATEGY_STATE_VERSION or state["round"] != server_round:
        log(WARNING, "%s is of round %s (format %s), not round %s (format %s): strategy state starts afresh", path,
            state.get("round"), state.get("format"), server_round, STRATEGY_STATE_VERSION)
        return
    for key in ("m_t", "v_t"):
        if key in state:
            setattr(strategy, key, {k: v.numpy() for k, v in state[key].items()})
    if "momentum" in state:
        strategy.momentum_vector = [v.numpy() for v in state["momentum"]]
    if "privacy" in state and getattr(strategy, "privacy", None) is not None:
        strategy.privacy.load_state_dict(state["privacy"])


def evaluate_round(strategy, grid: Grid, rnd: int, arrays: ArrayRecord, record: ConfigRecord, timeout: float) -> None:
    """Federated evaluation of the global model when ``strategy`` says it is due (Dice into the history)."""
    evaluate = list(strategy.configure_evaluate(rnd, arrays, record, grid))
    if evaluate:
        strategy.aggregate_evaluate(rnd, grid.send_and_receive(evaluate, timeout=timeout))


def site_status(messages, replies) -> dict[str, str]:
    """Each asked site's part in the round (Flower node id -> answered / failed / no reply): a site whose
    reply is an error failed; one with no reply at all timed out or lost its connection."""
    by_node = {r.metadata.src_node_id: r for r in replies}
    out: dict[str, str] = {}
    for m in messages:
        reply = by_node.get(m.metadata.dst_node_id)
        out[str(m.metadata.dst_node_id)] = NO_REPLY if reply is None else FAILED if reply.has_error() else ANSWERED
    return out


def write_live_page(cfg: FederationConfig, history: FederationHistory, state: str = "running",
                    detail: str = "") -> None:
    """The run's live ``report.html`` (:func:`fadal.evaluate.live.live_federation_page`); a page that
    cannot be written is logged, never the end of the run."""
    try:
        from fadal.evaluate.live import live_federation_page  # matplotlib only once a round is done

        live_federation_page(cfg, history, state, detail)
    except Exception as err:  # noqa: BLE001 - the page is a view; the run and its checkpoints go on
        log(WARNING, "live run page not written: %s: %s", type(err).__name__, err)


def save_round(model: torch.nn.Module, cfg: FederationConfig, plan: Plan, labels: dict[str, int],
               history: FederationHistory, rnd: int, strategy) -> None:
    """Round checkpoint, history and server state; ``global_model.pt`` last (the round a restart continues from)."""
    out = Path(cfg.out)
    save_checkpoint(model, out / "checkpoints" / f"round_{rnd:03d}.pt", labels, plan, cfg.train, {"round": rnd})
    write_history(history, out)
    save_strategy_state(strategy, out / "checkpoints" / "server_state.pt", rnd)
    save_checkpoint(model, out / "global_model.pt", labels, plan, cfg.train, {"round": rnd})


def write_history(history: FederationHistory, out: Path) -> Path:
    """``out/history.json`` (a field not recorded yet, e.g. Dice in a round without evaluation, is left out)."""
    return write_record(history, Path(out) / "history.json", exclude_none=True)


def read_history(path: Path) -> FederationHistory:
    """A federation's ``history.json`` as :func:`write_history` wrote it (one clear error naming the file otherwise)."""
    return read_record(FederationHistory, path, "federation history")
