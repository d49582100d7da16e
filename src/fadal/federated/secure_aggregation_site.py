"""The site side of secure aggregation (SecAgg+): see :mod:`fadal.federated.secure_aggregation` for the
protocol and the server side. Kept apart so that a ClientApp imports none of the coordinator's code."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fadal.config import SitePolicy
from fadal.errors import FadalInputError
from fadal.federated.policy import check_secagg_setup
from fadal.federated.site_task import SiteRuntime, admit, local_train, round_config, round_options
from fadal.model.net import build_network
from fadal.records import Plan


def is_secure_train(msg: Message) -> bool:
    """A train message of the SecAgg+ protocol (any stage), not a plain Message-API one."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_when_asked(policy_for: Callable[[Context], SitePolicy | None]) -> Mod:
    """``secaggplus_mod`` for SecAgg+ messages only, so one ClientApp serves plain and secure federations.

    The set-up stage (handled by ``secaggplus_mod`` alone) is first checked against the site's
    policy (``policy_for(context)``): its reconstruction threshold says how many sites must collude
    to unmask this one."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not is_secure_train(msg):
            return call_next(msg, context)
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if configs.get(Key.STAGE) == Stage.SETUP:
            check_secagg_setup(policy_for(context), int(configs.get(Key.THRESHOLD, 0)),
                               int(configs.get(Key.SHARE_NUMBER, 0)))
        return secaggplus_mod(msg, context, call_next)

    return mod


def _state_keys(plan: Plan, labels: dict[str, int]) -> dict[str, torch.Tensor]:
    """The network's state dict: names, shapes and dtypes for the legacy API's unnamed array list."""
    return build_network(max(labels.values()) + 1, plan.network).state_dict()


def secure_train(msg: Message, runtime: SiteRuntime) -> Message:
    """:func:`local_train` on a legacy ``FitIns``; the reply is a ``FitRes`` for ``secaggplus_mod`` to mask.

    Refuses (error at the site) when a value would be clipped or the weight overflow: the server
    cannot see either, so the aggregate would be silently wrong. The site's policy is checked
    before the network is built."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = ConfigRecord(dict(fitins.config))
    msg.content["config"] = config
    admit(runtime, round_config(msg), round_options(msg))
    plan = Plan.model_validate_json(str(config["plan"]))
    labels = {k: int(v) for k, v in json.loads(str(config["labels"])).items()}
    reference = _state_keys(plan, labels)
    received = parameters_to_ndarrays(fitins.parameters)
    msg.content["arrays"] = ArrayRecord({k: Array(a) for k, a in zip(reference, received, strict=True)})
    out = local_train(msg, runtime, secure=True)
    metrics = dict(out.content["metrics"])
    state = out.content["arrays"].to_numpy_ndarrays()
    clip, max_weight = float(config["secagg-clipping-range"]), float(config["secagg-max-weight"])
    if metrics["num-examples"] > max_weight:
        raise FadalInputError(f"site {runtime.name}: {metrics['num-examples']} training volumes exceed "
                              f"secagg_max_weight {max_weight:g}; raise it in the federation config")
    peak = max(float(np.abs(a).max()) for a in state if a.size)
    if peak > clip:
        raise FadalInputError(f"site {runtime.name}: a model value ({peak:.3g}) is outside secagg_clipping_range "
                              f"{clip:g}; raise it in the federation config")
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(state),
                    num_examples=int(metrics["num-examples"]), metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
