"""The partial-label loss does not punish predicting an organ that was never drawn."""

from __future__ import annotations

import torch

from fadal.model.losses import PartialLabelDiceCELoss


def _logits_for(labels: torch.Tensor, num_classes: int, scale: float = 8.0) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    return onehot * scale


def test_unknown_organ_prediction_is_not_penalised():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., :4, :, :] = 1  # organ 1 drawn in the left half
    truth_pred = torch.zeros(1, 8, 8, 8)
    truth_pred[:, :4] = 1
    truth_pred[:, 4:, :4] = 2  # network also finds organ 2 where the label says 0
    loss = PartialLabelDiceCELoss()
    logits = _logits_for(truth_pred, 3)
    known_all = torch.tensor([[True, True, True]])
    known_partial = torch.tensor([[True, True, False]])
    penalised = loss(logits, target, known_all)
    tolerated = loss(logits, target, known_partial)
    assert tolerated < 0.05
    assert penalised > tolerated + 0.3


def test_low_confidence_voxels_carry_no_loss():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., :4, :, :] = 1
    wrong = torch.zeros(1, 8, 8, 8)  # predicts background everywhere
    logits = _logits_for(wrong, 2)
    conf = torch.zeros(1, 1, 8, 8, 8)  # nothing trusted ...
    conf[..., 4:, :, :] = 1.0  # ... except the background half, where the prediction is right
    loss = PartialLabelDiceCELoss(confidence_threshold=0.5)
    assert loss(logits, target, torch.tensor([[True, True]]), conf) < 0.05
    assert loss(logits, target, torch.tensor([[True, True]])) > 1.0


def test_gradient_flows_and_training_reduces_loss():
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    logits = torch.zeros(1, 2, 8, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.2)
    loss_fn = PartialLabelDiceCELoss()
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(logits, target, torch.tensor([[True, True]]))
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
