"""The local training loop: used for site-only training, centralised training and inside each site's
federated ClientApp, so that all three compare like with like."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, MapTransform
from monai.utils import set_determinism
from torch.utils.data import ConcatDataset, RandomSampler

from fadal.config import PreprocessConfig, TrainConfig
from fadal.data.preprocess import training_item, training_transforms
from fadal.data.site import Site
from fadal.model.losses import ConditionalDistillationLoss, PartialLabelDiceCELoss


class KnownMaskd(MapTransform):
    """List of drawn class ids -> (C,) bool mask (collates into (B, C))."""

    def __init__(self, num_classes: int) -> None:
        super().__init__("known")
        self.num_classes = num_classes

    def __call__(self, data):
        d = dict(data)
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[0] = True
        mask[list(d["known"])] = True
        d["known"] = mask
        return d


def site_training_items(site: Site, amplified: Path | None = None, use_amplified: bool = False) -> list[dict]:
    """Real labels always; amplified pseudo-labels (with their confidence maps) when asked for."""
    items = [training_item(c.image, c.label, site.annotated_ids(c)) for c in site.labeled]
    if use_amplified and amplified is not None:
        for case in site.unlabeled:
            label = amplified / "labels" / f"{case.case_id}.nii.gz"
            conf = amplified / "confidence" / f"{case.case_id}.nii.gz"
            prov = amplified / "provenance" / f"{case.case_id}.json"
            if label.exists() and prov.exists() and provenance_qc_accepted(prov):
                known = _amplified_known(prov, site)
                items.append(training_item(case.image, label, known, conf if conf.exists() else None))
    return items


_QC_YES = {"accept", "accepted", "pass", "passed", "ok", "true"}


def provenance_qc_accepted(provenance: Path | dict) -> bool:
    """The QC decision of a provenance sidecar: ``"status": "rejected"`` or a ``"qc"`` verdict that is
    not an acceptance rejects; neither key (older outputs) = accepted.

    ``"qc"`` is read leniently (``fadal.amplify.qc`` writes ``{"accepted": bool, ...}``; a bool, a
    string such as ``"accepted"``, or ``decision``/``status`` also work) so that a rejected
    pseudo-label never reaches training, whichever stage wrote it (amplification, self-training).
    """
    import json

    prov = json.loads(Path(provenance).read_text()) if not isinstance(provenance, dict) else provenance
    if str(prov.get("status", "")).lower() == "rejected":
        return False
    qc = prov.get("qc")
    if qc is None:
        return True
    if isinstance(qc, bool):
        return qc
    if isinstance(qc, str):
        return qc.lower() in _QC_YES
    if isinstance(qc, dict):
        for key in ("accepted", "accept", "passed", "pass", "ok"):
            if key in qc:
                return bool(qc[key])
        for key in ("decision", "status", "verdict"):
            if key in qc:
                return str(qc[key]).lower() in _QC_YES
    return True


def _amplified_known(provenance: Path, site: Site) -> list[int]:
    """Organs the fusion actually produced (an organ no atlas drew stays unknown)."""
    import json

    prov = json.loads(provenance.read_text())
    fused = prov.get("organs_fused")
    if fused is None:
        return [v for v in site.labels.values() if v != 0]
    return [site.labels[o] if isinstance(o, str) else int(o) for o in fused]


def _with_version(item: dict, pre: PreprocessConfig) -> dict:
    """Add the preprocessing settings and file size/mtime so an on-disk preprocessing cache notices a
    changed preprocessing and changed inputs."""
    stamp = [pre.model_dump_json()]
    for key in ("image", "label", "confidence"):
        if item.get(key):
            st = Path(item[key]).stat()
            stamp.append(f"{st.st_size}-{st.st_mtime_ns}")
    return {**item, "version": "|".join(stamp)}


def make_loader(items: Sequence[dict], pre: PreprocessConfig, num_classes: int, batch_size: int = 1,
                cache_dir: Path | None = None, shuffle: bool = True,
                extra: Sequence[torch.utils.data.Dataset] = (), num_samples: int | None = None) -> DataLoader:
    """Deterministic preprocessing is cached (on disk when ``cache_dir`` is given, so fresh
    ClientApp processes in a deployment do not resample every round); augmentation is not.

    ``extra`` datasets yield ready, preprocessed items (``image``, ``label``, ``confidence`` tensors and
    ``known`` as a (C,) bool mask), e.g. :class:`fadal.amplify.synthesize.SyntheticPairs`, which draws
    a new synthetic pair on every access; they get the same random augmentation and are sampled in
    proportion to their length. ``num_samples`` fixes the items per epoch (drawn with replacement),
    so that runs on datasets of different sizes get the same number of optimiser steps.
    """
    fixed, random = training_transforms(pre)
    fixed = Compose([*fixed.transforms, KnownMaskd(num_classes)])
    items = [_with_version(i, pre) for i in items]
    if cache_dir is not None:
        base: Dataset = PersistentDataset(items, transform=fixed, cache_dir=cache_dir)
    else:
        base = CacheDataset(items, transform=fixed, progress=False, num_workers=0)
    ds: torch.utils.data.Dataset = Dataset(base, transform=random)
    if extra:
        ds = ConcatDataset([ds, *(Dataset(e, transform=random) for e in extra)])
    if num_samples is not None:
        sampler = RandomSampler(ds, replacement=True, num_samples=num_samples)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    optimizer_state: dict | None = None


def train_epochs(model: torch.nn.Module, loader: DataLoader, cfg: TrainConfig, epochs: int,
                 device: torch.device, proximal_mu: float = 0.0,
                 on_epoch: Callable[[int, float], None] | None = None,
                 teacher: torch.nn.Module | None = None, distill_weight: float = 0.0,
                 distill_temperature: float = 2.0, optimizer_state: dict | None = None) -> TrainResult:
    """Run ``epochs`` passes over ``loader``. ``proximal_mu`` > 0 adds the FedProx term; a frozen
    ``teacher`` with ``distill_weight`` > 0 adds ConDistFL conditional distillation (see losses.py).

    ``optimizer_state`` continues Adam's moment estimates from an earlier call (a site's previous
    round): restarting Adam every round makes its first, largest steps again each time."""
    model.to(device).train()
    loss_fn = PartialLabelDiceCELoss(cfg.confidence_threshold)
    distill = None
    if teacher is not None and distill_weight > 0:
        distill = ConditionalDistillationLoss(distill_temperature, cfg.confidence_threshold)
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if optimizer_state is not None:
        try:
            opt.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError):
            pass  # another network (e.g. a changed config): start the moments afresh
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    start, steps, total = time.perf_counter(), 0, 0.0
    for epoch in range(epochs):
        ep_loss, ep_steps = 0.0, 0
        for batch in loader:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            conf = batch["confidence"].to(device)
            known = batch["known"].to(device)
            opt.zero_grad(set_to_none=True)
            ctx = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
            with ctx:
                logits = model(image)
            loss = loss_fn(logits, label, known, conf)
            if distill is not None:
                with torch.no_grad(), (torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()):
                    teacher_logits = teacher(image)
                loss = loss + distill_weight * distill(logits, teacher_logits, label, known, conf)
            if anchor is not None:
                loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ep_loss += float(loss.detach())
            ep_steps += 1
        steps += ep_steps
        total += ep_loss
        if on_epoch is not None:
            on_epoch(epoch, ep_loss / max(ep_steps, 1))
    return TrainResult(total / max(steps, 1), steps, len(loader.dataset), time.perf_counter() - start,
                       opt.state_dict())


def seed_everything(seed: int, num_threads: int = 0) -> None:
    set_determinism(seed=seed)
    if num_threads:
        torch.set_num_threads(num_threads)
