"""The site side of federation: a Flower ``ClientApp`` that trains on its own folder only.

What leaves the site is exactly what :func:`reply` builds: the model's arrays and a few scalar
metrics (loss, number of training examples, seconds, mean Dice on the site's own held-out cases).
Images, labels, case ids and per-case numbers never do.

Where the site's data is:
* deployment (``flower-supernode --node-config "data-path=... site-name=..."``): ``node_config``;
* simulation: :func:`build_client_app` is given the site list and maps ``partition-id`` to a site.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fadal.config import PreprocessConfig, TrainConfig
from fadal.data.io import FadalInputError
from fadal.data.site import Site, load_site
from fadal.model.net import build_network, pick_device
from fadal.model.train import make_loader, seed_everything, site_training_items, train_epochs

#: The only metric keys a site may send (checked in :func:`reply`).
ALLOWED_METRICS = ("num-examples", "train-loss", "train-seconds", "dice-mean")


@dataclass
class SiteRuntime:
    """Where one site's data and local cache are (never sent anywhere)."""

    name: str
    data: Path
    amplified: Path | None
    use_amplified: bool
    cache_dir: Path


def site_from_node_config(node_config: dict) -> SiteRuntime:
    if "data-path" not in node_config:
        raise FadalInputError("this SuperNode has no 'data-path' in --node-config; start it with `fadal site --data DIR`")
    data = Path(str(node_config["data-path"]))
    amplified = node_config.get("amplified-path")
    return SiteRuntime(
        name=str(node_config.get("site-name", data.name)),
        data=data,
        amplified=Path(str(amplified)) if amplified else None,
        use_amplified=bool(node_config.get("use-amplified", False)),
        cache_dir=Path(str(node_config.get("cache-dir", data / ".fadal_cache"))),
    )


def _configs(msg: Message) -> tuple[TrainConfig, PreprocessConfig, dict[str, int], int]:
    cfg = msg.content["config"]
    train_cfg = TrainConfig.model_validate_json(str(cfg["train-config"]))
    pre = PreprocessConfig.model_validate_json(str(cfg["preprocess-config"]))
    labels = {k: int(v) for k, v in json.loads(str(cfg["labels"])).items()}
    epochs = int(cfg.get("local-epochs", 1))
    return train_cfg, pre, labels, epochs


def _load(runtime: SiteRuntime, labels: dict[str, int]) -> Site:
    site = load_site(runtime.data, name=runtime.name, validate=False)
    if site.labels != labels:
        raise FadalInputError(
            f"{runtime.data / 'dataset.json'}: label set {site.labels} differs from the federation's {labels} "
            "(model/label-set mismatch): every site must use the federation's label values"
        )
    return site


def _model_from(msg: Message, num_classes: int, train_cfg: TrainConfig) -> torch.nn.Module:
    model = build_network(num_classes, train_cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    return model


def reply(msg: Message, metrics: dict[str, float | int], model: torch.nn.Module | None = None) -> Message:
    """Build the only kind of message a site sends: arrays + allow-listed scalar metrics."""
    bad = [k for k in metrics if k not in ALLOWED_METRICS and not k.startswith("dice-")]
    if bad:
        raise ValueError(f"refusing to send non-allow-listed metrics {bad}")
    scalars = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in metrics.items()}
    content = RecordDict({"metrics": MetricRecord(scalars)})
    if model is not None:
        content["arrays"] = ArrayRecord(model.state_dict())
    return Message(content=content, reply_to=msg)


def local_train(msg: Message, runtime: SiteRuntime) -> Message:
    train_cfg, pre, labels, epochs = _configs(msg)
    seed_everything(train_cfg.seed + int(msg.content["config"].get("server-round", 0)), train_cfg.num_threads)
    site = _load(runtime, labels)
    items = site_training_items(site, runtime.amplified, runtime.use_amplified)
    model = _model_from(msg, site.num_classes, train_cfg)
    loader = make_loader(items, pre, site.num_classes, train_cfg.batch_size, cache_dir=runtime.cache_dir / "train")
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_epochs(model, loader, train_cfg, epochs, pick_device(), proximal_mu=mu)
    return reply(msg, {"num-examples": len(items), "train-loss": result.loss, "train-seconds": result.seconds},
                 model.cpu())


def local_evaluate(msg: Message, runtime: SiteRuntime) -> Message:
    """Mean Dice per organ over the site's held-out cases (aggregate numbers only)."""
    from fadal.evaluate.evaluate import evaluate_model_on_cases

    train_cfg, pre, labels, _ = _configs(msg)
    site = _load(runtime, labels)
    cases = site.test or site.labeled
    model = _model_from(msg, site.num_classes, train_cfg)
    summary = evaluate_model_on_cases(model, site, cases, pre, pick_device())["summary"]
    metrics: dict[str, float | int] = {"num-examples": len(cases)}
    for organ, vals in summary.items():
        if vals.get("dice") is not None:
            metrics["dice-mean" if organ == "mean" else f"dice-{organ}"] = float(vals["dice"])
    return reply(msg, metrics)


def build_client_app(sites: list[SiteRuntime] | None = None) -> ClientApp:
    """``sites`` given: simulation (``partition-id`` picks one); ``None``: deployment (``node_config``)."""
    app = ClientApp()

    def runtime_for(context: Context) -> SiteRuntime:
        if sites is None:
            return site_from_node_config(dict(context.node_config))
        return sites[int(context.node_config["partition-id"])]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return local_train(msg, runtime_for(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return local_evaluate(msg, runtime_for(context))

    return app


#: Deployment entry point (``[tool.flwr.app.components] clientapp``).
app = build_client_app()
