"""Partial-label-aware loss: unknown organs are not background, low-confidence voxels are not truth.

A site that never drew the pancreas still has pancreas voxels labeled 0. Plain cross-entropy would
teach the network that pancreas is background. The *marginal* loss (Shi et al., MedIA 2021) instead
merges the probabilities of background and every unknown organ into one class before computing
cross-entropy, and Dice is computed only on the organs that were drawn. Amplified (pseudo) labels
come with a per-voxel confidence map: voxels below the threshold carry no loss at all.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss


class PartialLabelDiceCELoss(torch.nn.Module):
    def __init__(self, confidence_threshold: float = 0.0, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.threshold = confidence_threshold
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        # Per-channel Dice so that unknown organs can be left out of the mean.
        self.dice = DiceLoss(include_background=True, softmax=False, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor,
                confidence: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B,C,...), target (B,1,...) integer labels, known (B,C) bool (background always known),
        confidence (B,1,...) in [0,1] or None."""
        b, c = logits.shape[:2]
        known = known.to(torch.bool).clone()
        known[:, 0] = True
        prob = torch.softmax(logits.float(), dim=1)
        unknown = (~known).to(prob.dtype).view(b, c, *([1] * (logits.ndim - 2)))
        # Marginalise: background absorbs unknown organs' probability mass.
        merged = prob * (1 - unknown)
        merged[:, :1] = merged[:, :1] + (prob * unknown).sum(dim=1, keepdim=True)
        weight = torch.ones_like(target, dtype=prob.dtype)
        if confidence is not None:
            weight = (confidence >= self.threshold).to(prob.dtype)
        tgt = target.long().clamp(min=0, max=c - 1)
        onehot = torch.zeros_like(prob).scatter_(1, tgt, 1.0)
        picked = (merged * onehot).sum(dim=1, keepdim=True).clamp_min(1e-6)
        ce = -(torch.log(picked) * weight).sum() / weight.sum().clamp_min(1.0)
        dice_c = self.dice(merged * weight, onehot * weight).view(b, c)  # (B, C)
        # Dice on drawn organs present in the trusted voxels: soft Dice of an empty target is ~1
        # whatever the prediction, so absent organs are left to the cross-entropy term.
        present = (onehot * weight).flatten(2).sum(-1) > 0
        dice_mask = known & present
        dice_mask[:, 0] = False  # organs only; background is covered by CE
        dice = (dice_c * dice_mask).sum() / dice_mask.sum().clamp_min(1)
        return self.lambda_dice * dice + self.lambda_ce * ce
