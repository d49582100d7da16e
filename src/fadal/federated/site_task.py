"""A site's work in a federation (Flower examples' ``task.py`` role): train, evaluate, fingerprint, on its own folder only.

What leaves the site is exactly what :func:`reply` builds: the model's arrays and a few scalar
metrics (loss, number of training examples, seconds, mean Dice on the site's own held-out cases,
for the federation's organs only). Images, labels, case ids and per-case numbers never do, nor do
error messages (:mod:`fadal.federated.site_errors`).

Every message is first checked against the site's own policy (:mod:`fadal.federated.policy`)
before any data are read; a violation is refused, never silently followed.

Per-run options arrive in the train config (see ``server_app.train_config_record``):

* ``local-norm`` (FedBN): the normalisation layers' parameters never leave the site. The server does
  not send them; the site restores its own from its cache folder (in deployment every message
  starts a fresh process) and saves them after training.
* ``partial-label-mode = condist``: ConDistFL distillation from a frozen copy of the received model.
* ``dp-clip`` > 0: the update (local - received) is clipped to that L2 norm and Gaussian noise of
  ``dp-noise-multiplier`` x ``dp-clip`` is added before anything is sent; the release is first
  recorded in the site's epsilon ledger (:mod:`fadal.federated.epsilon_ledger`). Under DP no
  data-dependent scalar leaves the site: train replies carry ``num-examples`` = 1 only (every site
  weighs the same) and evaluate replies no metric (see :mod:`fadal.federated.privacy`).
* ``transfer-dtype = float16``: arrays are sent as float16 (the server averages in float32).
* ``synthesis`` / ``selftrain-every``: amplification at the site during the federation (synthetic
  pairs, pseudo-labels refined by the received global model): :mod:`fadal.federated.site_amplification`.

Where the site's data is:
* deployment (``flower-supernode --node-config "data-path=... site-name=..."``): ``node_config``;
* simulation: :func:`fadal.federated.client_app.build_client_app` is given the site list and maps
  ``partition-id`` to a site.
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fadal.config import SelfTrainConfig, SitePolicy, SynthesisConfig, TrainConfig, load_yaml
from fadal.records import Plan
from fadal.data.io import PRIVATE, private_dir, save_torch
from fadal.errors import FadalInputError, SiteRefusal
from fadal.data.site import Site, load_site
from fadal.federated import policy as site_policy
from fadal.federated import site_amplification as amp
from fadal.federated.epsilon_ledger import EpsilonLedger
from fadal.model.engine import fit, make_sampler, seed_everything
from fadal.model.net import build_network, norm_state_keys, pick_device
from fadal.model.patches import site_training_items

#: The only metric keys a site may send (checked in :func:`reply`).
ALLOWED_METRICS = ("num-examples", "train-loss", "train-seconds", "client-seconds", "startup-seconds", "dice-mean")

_first_message = True


def startup_seconds() -> float:
    """Seconds from this process's start to its first message, else 0.

    A deployment SuperNode starts a fresh ClientApp process for every message, which imports Python,
    torch and MONAI again before any work: this is that cost, reported so that benchmarks can tell it
    apart from Flower's messaging. Linux (/proc); 0 elsewhere."""
    global _first_message
    if not _first_message:
        return 0.0
    _first_message = False
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return max(float(Path("/proc/uptime").read_text().split()[0]) - started, 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class SiteRuntime:
    """Where one site's data and local cache are, and the site's own policy (never sent anywhere)."""

    name: str
    data: Path
    amplified: Path | None
    use_amplified: bool
    cache_dir: Path
    policy: SitePolicy | None = None

    def ledger(self) -> EpsilonLedger:
        """This site's epsilon ledger (the policy's, else in its local state folder)."""
        path = self.policy.ledger if self.policy is not None and self.policy.ledger else None
        delta = self.policy.epsilon_delta if self.policy is not None else SitePolicy().epsilon_delta
        return EpsilonLedger(path or self.cache_dir / "privacy_ledger.json", delta)


def site_from_node_config(node_config: dict) -> SiteRuntime:
    if "data-path" not in node_config:
        raise FadalInputError("this SuperNode has no 'data-path' in --node-config; start it with `fadal site --data DIR`")
    data = Path(str(node_config["data-path"]))
    amplified = node_config.get("amplified-path")
    policy = node_config.get("policy-path")
    return SiteRuntime(
        name=str(node_config.get("site-name", data.name)),
        data=data,
        amplified=Path(str(amplified)) if amplified else None,
        use_amplified=bool(node_config.get("use-amplified", False)),
        cache_dir=Path(str(node_config.get("cache-dir", data / ".fadal_cache"))),
        policy=load_yaml(SitePolicy, str(policy)) if policy else None,
    )


@dataclass
class RoundConfig:
    """What every train/evaluate message says about the network and its training."""

    train: TrainConfig
    plan: Plan
    labels: dict[str, int]
    local_steps: int
    total_steps: int


def round_config(msg: Message) -> RoundConfig:
    cfg = msg.content["config"]
    local_steps = int(cfg["local-steps"])
    return RoundConfig(train=TrainConfig.model_validate_json(str(cfg["train-config"])),
                       plan=Plan.model_validate_json(str(cfg["plan"])),
                       labels={k: int(v) for k, v in json.loads(str(cfg["labels"])).items()},
                       local_steps=local_steps, total_steps=int(cfg.get("total-steps", local_steps)))


def load_site_for(runtime: SiteRuntime, labels: dict[str, int]) -> Site:
    site = load_site(runtime.data, name=runtime.name, validate=False)
    if site.labels != labels:
        raise FadalInputError(
            f"{runtime.data / 'dataset.json'}: label set {site.labels} differs from the federation's {labels} "
            "(model/label-set mismatch): every site must use the federation's label values"
        )
    return site


@dataclass
class RoundOptions:
    """The federation-level switches a train/evaluate message carries (defaults: plain FedAvg)."""

    proximal_mu: float = 0.0
    local_norm: bool = False
    transfer_dtype: str = "float32"
    partial_label_mode: str = "marginal"
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    dp_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    server_round: int = 0
    run_id: int = 0
    synthesis: SynthesisConfig | None = None
    selftrain_every: int = 0
    selftrain: SelfTrainConfig | None = None


def round_options(msg: Message) -> RoundOptions:
    cfg = msg.content["config"]
    opts = RoundOptions(
        proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        local_norm=bool(cfg.get("local-norm", False)),
        transfer_dtype=str(cfg.get("transfer-dtype", "float32")),
        partial_label_mode=str(cfg.get("partial-label-mode", "marginal")),
        distill_weight=float(cfg.get("distill-weight", 1.0)),
        distill_temperature=float(cfg.get("distill-temperature", 2.0)),
        dp_clip=float(cfg.get("dp-clip", 0.0)),
        dp_noise_multiplier=float(cfg.get("dp-noise-multiplier", 0.0)),
        server_round=int(cfg.get("server-round", 0)),
        run_id=int(msg.metadata.run_id or 0),
        synthesis=SynthesisConfig.model_validate_json(str(cfg["synthesis"])) if cfg.get("synthesis") else None,
        selftrain_every=int(cfg.get("selftrain-every", 0)),
        selftrain=SelfTrainConfig.model_validate_json(str(cfg["selftrain"])) if cfg.get("selftrain") else None,
    )
    if opts.transfer_dtype not in ("float32", "float16"):
        raise ValueError(f"unknown transfer-dtype {opts.transfer_dtype!r}")
    if opts.partial_label_mode not in ("marginal", "condist"):
        raise ValueError(f"unknown partial-label-mode {opts.partial_label_mode!r}")
    return opts


def local_norm_path(runtime: SiteRuntime) -> Path:
    """Where a FedBN site keeps its own normalisation layers between messages (its disk only)."""
    return runtime.cache_dir / "fedbn_local_norm.pt"


def save_local_norm(model: torch.nn.Module, runtime: SiteRuntime, run_id: int, server_round: int) -> Path:
    state = model.state_dict()
    return save_torch({"run": int(run_id), "round": int(server_round),
                       "state": {k: state[k].detach().cpu().clone() for k in norm_state_keys(model)}},
                      local_norm_path(runtime), mode=PRIVATE)


def restore_local_norm(model: torch.nn.Module, runtime: SiteRuntime, run_id: int | None = None) -> bool:
    """Load this site's normalisation layers as it saved them last (only if saved by run ``run_id``,
    when given). False when there is nothing to restore."""
    path = local_norm_path(runtime)
    if not path.exists():
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if run_id is not None and int(saved["run"]) != int(run_id):
        return False
    keys = norm_state_keys(model)
    if set(saved["state"]) != set(keys):
        raise FadalInputError(f"{path}: saved normalisation layers do not match the network (model/label-set mismatch)")
    model.load_state_dict(saved["state"], strict=False)
    return True


def model_from_message(msg: Message, num_classes: int, plan: Plan, runtime: SiteRuntime | None = None,
                opts: RoundOptions | None = None, for_training: bool = True) -> torch.nn.Module:
    """The received global model; under FedBN completed with this site's own normalisation layers
    (training in round 1 starts from their init; evaluation always uses the site's latest)."""
    model = build_network(num_classes, plan.network)
    received = msg.content["arrays"].to_torch_state_dict()
    if opts is None or not opts.local_norm:
        model.load_state_dict(received, strict=True)
        return model
    local = set(norm_state_keys(model))
    result = model.load_state_dict(received, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - local:
        raise ValueError(f"received arrays do not fit the network (missing {sorted(set(result.missing_keys) - local)[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}): model/label-set mismatch?")
    if runtime is not None and not (for_training and opts.server_round == 1):
        # Any round after the first continues from the site's own layers, also when the server
        # resumed an interrupted federation (a new Flower run); round 1 starts from the init.
        restore_local_norm(model, runtime)
    return model


def privatise_update(local: dict[str, torch.Tensor], received: dict[str, torch.Tensor], clip: float,
                     noise_multiplier: float, generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Client-side Gaussian mechanism on the model update: received + clip(local - received) + noise.

    The update of every floating-point tensor is clipped jointly to L2 norm ``clip``; then
    N(0, (noise_multiplier * clip)^2) is added to every element. Returns (arrays to send, the
    update's norm before clipping; the norm stays at the site). Noise comes from the OS's entropy
    unless a ``generator`` is given (tests)."""
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    keys = [k for k, v in local.items() if v.is_floating_point()]
    deltas = {k: local[k].detach().float().cpu() - received[k].detach().float().cpu() for k in keys}
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    scale = min(1.0, clip / max(norm, 1e-12))
    std = noise_multiplier * clip
    out = dict(local)
    for k in keys:
        noise = torch.randn(deltas[k].shape, generator=generator) * std if std > 0 else 0.0
        out[k] = (received[k].detach().float().cpu() + deltas[k] * scale + noise).to(local[k].dtype)
    return out, norm


def reply(msg: Message, metrics: dict[str, float | int], model: torch.nn.Module | None = None,
          state: dict[str, torch.Tensor] | None = None, organs: tuple[str, ...] = ()) -> Message:
    """Build the only kind of message a site sends: arrays (``model``'s or ``state``) + allow-listed
    scalar metrics: :data:`ALLOWED_METRICS` and ``dice-<organ>`` for the federation's ``organs`` only."""
    allowed = set(ALLOWED_METRICS) | {f"dice-{organ}" for organ in organs}
    bad = [k for k in metrics if k not in allowed]
    if bad:
        raise SiteRefusal("metric-allow-list", f"refusing to send non-allow-listed metrics {bad}")
    scalars = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in metrics.items()}
    content = RecordDict({"metrics": MetricRecord(scalars)})
    if model is not None and state is None:
        state = model.state_dict()
    if state is not None:
        content["arrays"] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    return Message(content=content, reply_to=msg)


def admit(runtime: SiteRuntime, rc: RoundConfig, opts: RoundOptions) -> int:
    """The checks every train/evaluate message passes before any work; returns the torch threads."""
    site_policy.check_privacy(runtime.policy, opts.dp_clip, opts.dp_noise_multiplier)
    private_dir(runtime.cache_dir)
    return site_policy.check_compute(runtime.policy, rc.plan, rc.train, max(rc.labels.values()) + 1)


def organ_names(labels: dict[str, int]) -> tuple[str, ...]:
    """The federation's organs (every label but background): the only ``dice-*`` keys a site sends."""
    return tuple(name for name, value in labels.items() if value != 0)


def amplified_training_data(model: torch.nn.Module, site: Site, runtime: SiteRuntime, rc: RoundConfig,
                            opts: RoundOptions) -> tuple[list[dict], list[torch.utils.data.Dataset]]:
    """What this round trains on: real labels, the site's pseudo-labels (fused, or refined by a global
    model in a self-training round and kept from then on) and synthetic pairs (see site_amplification)."""
    baseline = runtime.amplified if runtime.use_amplified else None
    refined, last = amp.latest_refinement(runtime.cache_dir, opts.run_id)
    if opts.selftrain is not None and amp.is_refinement_round(opts.server_round, opts.selftrain_every, last):
        refined = amp.refine_with_global_model(model, site, baseline, runtime.cache_dir, opts.selftrain, rc.plan,
                                               opts.run_id, opts.server_round)
    if refined is not None:
        items = site_training_items(site, refined, True)
    else:
        items = site_training_items(site, runtime.amplified, runtime.use_amplified)
    pairs = None
    if opts.synthesis is not None:
        pairs = amp.synthetic_pairs(site, runtime.amplified, runtime.cache_dir, opts.synthesis, rc.plan, len(items))
    return items, [pairs] if pairs is not None else []


def local_train(msg: Message, runtime: SiteRuntime, secure: bool = False) -> Message:
    """One round of local training; ``secure``: called by SecAgg+ (the reply is masked before it leaves)."""
    start = time.perf_counter()
    startup = startup_seconds()  # before any work: the process's start-up, not its training
    rc = round_config(msg)
    opts = round_options(msg)
    site_policy.check_training(runtime.policy, secure, opts.local_norm, rc.local_steps)
    threads = admit(runtime, rc, opts)
    if opts.dp_clip > 0:
        runtime.ledger().spend(opts.dp_noise_multiplier, opts.dp_clip, opts.run_id, opts.server_round,
                               runtime.policy.epsilon_budget if runtime.policy is not None else None)
    seed_everything(rc.train.seed + opts.server_round, threads)
    site = load_site_for(runtime, rc.labels)
    model = model_from_message(msg, site.num_classes, rc.plan, runtime, opts)
    items, extra = amplified_training_data(model, site, runtime, rc, opts)
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    teacher = None
    all_known = all(len(set(it["known"]) | {0}) >= site.num_classes for it in items)
    if opts.partial_label_mode == "condist" and opts.distill_weight > 0 and not all_known:
        teacher = copy.deepcopy(model)  # the global model as received (+ this site's norm layers)
    sampler = make_sampler(items, rc.plan, rc.train, site.num_classes, extra, cache_dir=runtime.cache_dir / "train",
                           seed=rc.train.seed + opts.server_round)
    # AdamW's moments stay at the site between rounds (on disk: a deployment starts a fresh process per message).
    opt_path = runtime.cache_dir / f"optimizer_run{opts.run_id}.pt"
    opt_state = torch.load(opt_path, weights_only=True) if opts.server_round > 1 and opt_path.exists() else None
    result = fit(model, sampler, rc.plan, rc.train, pick_device(), rc.local_steps,
                 start_step=max(opts.server_round - 1, 0) * rc.local_steps, total_steps=rc.total_steps,
                 proximal_mu=opts.proximal_mu, teacher=teacher, distill_weight=opts.distill_weight,
                 distill_temperature=opts.distill_temperature, optimizer_state=opt_state)
    save_torch(result.optimizer_state, opt_path, mode=PRIVATE)
    model = model.cpu()
    state = model.state_dict()
    if opts.local_norm:
        save_local_norm(model, runtime, opts.run_id, opts.server_round)
        local = set(norm_state_keys(model))
        state = {k: v for k, v in state.items() if k not in local}  # FedBN: norm layers never leave the site
    metrics = {"num-examples": len(items), "train-loss": result.loss, "train-seconds": result.seconds,
               "client-seconds": time.perf_counter() - start, "startup-seconds": startup}
    if opts.dp_clip > 0:
        state, _ = privatise_update(state, received, opts.dp_clip, opts.dp_noise_multiplier)
        metrics = {"num-examples": 1}  # DP: the noised update is the only release (privacy.py)
    if opts.transfer_dtype == "float16":
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    return reply(msg, metrics, state=state)


def local_evaluate(msg: Message, runtime: SiteRuntime) -> Message:
    """Mean Dice per organ over the site's held-out cases (aggregate numbers only; none under DP:
    Dice over a few cases cannot be usefully noised, so it is not sent)."""
    from fadal.evaluate.evaluate import evaluate_model_on_cases

    rc = round_config(msg)
    opts = round_options(msg)
    site_policy.check_evaluation(runtime.policy)
    threads = admit(runtime, rc, opts)
    if opts.dp_clip > 0:
        return reply(msg, {})
    if threads:
        torch.set_num_threads(threads)
    site = load_site_for(runtime, rc.labels)
    cases = site.test or site.labeled
    model = model_from_message(msg, site.num_classes, rc.plan, runtime, opts, for_training=False)
    summary = evaluate_model_on_cases(model, site, cases, rc.plan, pick_device())["summary"]
    metrics: dict[str, float | int] = {"num-examples": len(cases)}
    for organ, vals in summary.items():
        if vals.get("dice") is not None:
            metrics["dice-mean" if organ == "mean" else f"dice-{organ}"] = float(vals["dice"])
    return reply(msg, metrics, organs=organ_names(rc.labels))


def local_fingerprint(msg: Message, runtime: SiteRuntime) -> Message:
    """The site's dataset fingerprint for planning: aggregate statistics only (see fadal.records.Fingerprint)."""
    from fadal.plan.fingerprint import site_fingerprint

    site_policy.check_fingerprint(runtime.policy)
    labels = {k: int(v) for k, v in json.loads(str(msg.content["config"]["labels"])).items()}
    site = load_site_for(runtime, labels)
    fingerprint = site_fingerprint(site)
    return Message(RecordDict({"fingerprint": ConfigRecord({"fingerprint": fingerprint.model_dump_json()})}),
                   reply_to=msg)
