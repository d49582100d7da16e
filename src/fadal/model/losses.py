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


class ConditionalDistillationLoss(torch.nn.Module):
    """ConDistFL conditional distillation (Wang, Shen, Oda, Mori, Roth 2023).

    A site that did not draw some organs labels their voxels background. On those *background*
    voxels the site knows only that the voxel is not one of its drawn organs, so the only thing its
    labels say nothing about is how the probability splits between background and the organs it
    did not draw. That split is taken from the frozen global model (teacher) it received this round:
    both models' probabilities are renormalised over G = {background} + unknown organs,

        p~_c = p_c / sum_{c' in G} p_c'    (c in G, softmax at temperature T)

    and the student's conditional distribution is pulled to the teacher's with
    KL(q~ || p~) * T^2, averaged over the masked voxels. The mask (as in ConDistFL's reference code)
    keeps voxels whose local label is background, where the teacher does not predict one of the
    site's drawn organs (its false positives are not taught), and whose label confidence passes the
    threshold. Drawn organs' channels get no gradient from this term, nor do voxels of drawn organs;
    on a site that drew every organ G = {background} and the term is exactly zero.
    """

    def __init__(self, temperature: float = 2.0, confidence_threshold: float = 0.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.threshold = confidence_threshold

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                known: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        """student/teacher logits (B,C,...), target (B,1,...) integer labels, known (B,C) bool (drawn
        organs; background is added), confidence (B,1,...) or None."""
        b, c = student_logits.shape[:2]
        spatial = [1] * (student_logits.ndim - 2)
        known = known.to(torch.bool).clone()
        known[:, 0] = True
        group = ~known
        group[:, 0] = True  # G = background + organs this case did not draw
        group_v = group.view(b, c, *spatial)
        t = self.temperature
        s = student_logits.float() / t
        q = teacher_logits.detach().float() / t
        # Log-softmax restricted to G: channels outside G are set to a very negative finite value
        # (exactly zero probability, no NaN through 0 * log 0) and selected out below.
        very_negative = torch.tensor(-1e9, dtype=s.dtype, device=s.device)
        log_p = torch.log_softmax(torch.where(group_v, s, very_negative), dim=1)
        log_q = torch.log_softmax(torch.where(group_v, q, very_negative), dim=1)
        kl = (torch.exp(log_q) * (log_q - log_p) * group_v).sum(dim=1, keepdim=True) * (t * t)  # (B,1,...)

        known_organ = known.clone()
        known_organ[:, 0] = False
        teacher_label = teacher_logits.detach().argmax(dim=1, keepdim=True)
        teacher_says_known = torch.gather(known_organ, 1, teacher_label.flatten(1)).view_as(teacher_label)
        mask = (target.long() == 0) & ~teacher_says_known
        if confidence is not None:
            mask = mask & (confidence >= self.threshold)
        mask = mask.to(kl.dtype)
        return (kl * mask).sum() / mask.sum().clamp_min(1.0)
