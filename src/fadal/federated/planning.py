"""The federation's plan: from the config, from the checkpoint being resumed, or from the sites' fingerprints.

Each site answers one query message with its :class:`~fadal.records.Fingerprint` (aggregate statistics,
no per-case value); the coordinator merges them and plans, as FednnU-Net does. Nothing else is asked.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from fadal.config import FederationConfig
from fadal.data.io import write_json
from fadal.model.infer import read_checkpoint
from fadal.plan.fingerprint import merge_fingerprints
from fadal.plan.planner import make_plan
from fadal.records import Fingerprint, Plan

FINGERPRINT_TASK = "fingerprint"


def wait_for_sites(grid: Grid, num_sites: int, timeout: float) -> list[int]:
    """The connected nodes once ``num_sites`` are, or after ``timeout`` seconds. Flower's strategies
    size their sample from the nodes connected at that moment, so a round started before every
    site joined would train on fewer sites than are coming."""
    start = time.monotonic()
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= num_sites or time.monotonic() - start > timeout:
            return nodes
        time.sleep(1.0)


def request_fingerprints(grid: Grid, labels: dict[str, int], num_sites: int, timeout: float,
                         join_timeout: float) -> list[Fingerprint]:
    nodes = wait_for_sites(grid, num_sites, join_timeout)
    config = ConfigRecord({"task": FINGERPRINT_TASK, "labels": json.dumps(labels)})
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = [m for m in grid.send_and_receive(messages, timeout=timeout) if not m.has_error()]
    if len(replies) < num_sites:
        raise RuntimeError(f"planning: {len(replies)} of {num_sites} sites sent their fingerprint; see the sites' logs")
    return [Fingerprint.model_validate_json(str(m.content["fingerprint"]["fingerprint"])) for m in replies]


def federation_plan(grid: Grid, cfg: FederationConfig, labels: dict[str, int], num_sites: int) -> Plan:
    """The plan of this run (written to ``out/plan.json``): a resumed run keeps its checkpoint's plan."""
    out = Path(cfg.out)
    resumed = out / "global_model.pt"
    if cfg.resume and resumed.exists() and (out / "history.json").exists():
        plan = Plan.model_validate(read_checkpoint(resumed)["plan"])
    elif cfg.plan is not None:
        plan = cfg.plan
    else:
        prints = request_fingerprints(grid, labels, num_sites, cfg.round_timeout, cfg.join_timeout)
        plan = cfg.plan_for_strategy(make_plan(merge_fingerprints(prints), labels, cfg.planner))
        log(INFO, "Planned from %s site fingerprints: spacing %s mm, patch %s", len(prints),
            plan.preprocess.spacing_mm, plan.patch_size)
    write_json(plan.model_dump(mode="json"), out / "plan.json")
    return plan
