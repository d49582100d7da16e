"""THE training loop: every path (local, pooled, each site's federated round, self-training) calls :func:`fit`.

Patches at the plan's resolution (see :mod:`fadal.model.patches`), AdamW with a poly or cosine decay over
the whole run (a federated round continues the schedule where the last round left it), the partial-
label loss (with deep supervision when the network has it), optional FedProx and ConDistFL terms, and
a step or wall-clock budget. CUDA gets mixed precision and channels-last; the CPU gets float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.utils import set_determinism

from fadal.config import TrainConfig
from fadal.records import Plan
from fadal.model.losses import ConditionalDistillationLoss, PartialLabelDiceCELoss
from fadal.model.net import build_network, pick_device
from fadal.model.patches import PatchSampler, load_volumes

log = logging.getLogger(__name__)

#: progress(step, steps, this step's loss, elapsed seconds)
Progress = Callable[[int, int, float, float], None]


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    optimizer_state: dict | None = None
    stopped_by: str = "steps"  # or "time"


def seed_everything(seed: int, num_threads: int = 0) -> None:
    set_determinism(seed=seed)
    if num_threads:
        torch.set_num_threads(num_threads)


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the whole run."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights: 1, 1/2, 1/4, ... normalised to sum 1."""
    w = [0.5 ** k for k in range(heads)]
    return [x / sum(w) for x in w]


def make_sampler(items: Sequence[dict], plan: Plan, cfg: TrainConfig, num_classes: int,
                 extra: Sequence[torch.utils.data.Dataset] = (), cache_dir: Path | None = None,
                 seed: int | None = None) -> PatchSampler:
    seed = cfg.seed if seed is None else seed
    volumes = load_volumes(items, plan, num_classes, cache_dir=cache_dir, seed=seed)
    return PatchSampler(volumes, plan, cfg.foreground_fraction, cfg.augment, num_classes, extra=extra, seed=seed,
                        balance=cfg.foreground_balance, amplified_weight=cfg.amplified_weight)


def fit(model: torch.nn.Module, sampler: PatchSampler, plan: Plan, cfg: TrainConfig, device: torch.device,
        steps: int, start_step: int = 0, total_steps: int | None = None, minutes: float | None = None,
        proximal_mu: float = 0.0, teacher: torch.nn.Module | None = None, distill_weight: float = 0.0,
        distill_temperature: float = 2.0, optimizer_state: dict | None = None,
        progress: Progress | None = None) -> TrainResult:
    """Train ``model`` for ``steps`` optimiser steps (or until ``minutes`` have passed).

    ``start_step``/``total_steps`` place these steps in a longer run (a site's round ``r`` of a
    federation): the learning rate follows the schedule over ``total_steps``. With a time budget the
    schedule follows the elapsed share of the budget instead. ``optimizer_state`` continues AdamW's
    moments from an earlier call (a site's previous round)."""
    total_steps = total_steps or start_step + steps
    budget_s = minutes * 60.0 if minutes else None
    cuda = device.type == "cuda"
    use_amp = cfg.amp and cuda
    memory_format = torch.channels_last_3d if use_amp else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    loss_fn = PartialLabelDiceCELoss(cfg.confidence_threshold)
    distill = None
    if teacher is not None and distill_weight > 0:
        distill = ConditionalDistillationLoss(distill_temperature, cfg.confidence_threshold)
        teacher.to(device, memory_format=memory_format).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        try:
            opt.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as err:
            log.warning("optimiser state does not fit this network (%s): its moments start afresh", err)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    start, done, total, stopped_by = time.perf_counter(), 0, 0.0, "steps"
    for i in range(steps):
        elapsed = time.perf_counter() - start
        if budget_s is not None and elapsed >= budget_s:
            stopped_by = "time"
            break
        share = elapsed / budget_s if budget_s else (start_step + i) / max(total_steps, 1)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.schedule, share)
        batch = sampler.batch(plan.batch_size)
        image = batch["image"].to(device, memory_format=memory_format)
        label, conf, known = (batch[k].to(device) for k in ("label", "confidence", "known"))
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(image)
        heads = out.unbind(1) if out.ndim == image.ndim + 1 else (out,)
        loss = sum(w * loss_fn(h, label, known, conf) for w, h in zip(supervision_weights(len(heads)), heads))
        if distill is not None:
            with torch.no_grad(), autocast():
                teacher_logits = teacher(image)
            loss = loss + distill_weight * distill(heads[0], teacher_logits, label, known, conf)
        if anchor is not None:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step_loss = float(loss.detach())
        total += step_loss
        done += 1
        if progress is not None:
            progress(done, steps, step_loss, time.perf_counter() - start)
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(total / max(done, 1), done, len(sampler), time.perf_counter() - start, opt.state_dict(),
                       stopped_by)


def train_model(items: Sequence[dict], plan: Plan, cfg: TrainConfig, num_classes: int, steps: int | None = None,
                extra: Sequence[torch.utils.data.Dataset] = (), model: torch.nn.Module | None = None,
                minutes: float | None = None, progress: Progress | None = None
                ) -> tuple[torch.nn.Module, TrainResult]:
    """Train (a new network unless ``model`` is given) on ``items`` + ``extra`` datasets for ``steps``
    (default ``cfg.steps``) or ``minutes`` (default ``cfg.minutes``)."""
    seed_everything(cfg.seed, cfg.num_threads)
    model = model if model is not None else build_network(num_classes, plan.network)
    sampler = make_sampler(items, plan, cfg, num_classes, extra)
    result = fit(model, sampler, plan, cfg, pick_device(), steps or cfg.steps,
                 minutes=minutes if minutes is not None else cfg.minutes, progress=progress)
    return model, result
