"""Partial labels across sites: ConDistFL conditional distillation on tiny tensors, at a site, in a federation."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import torch
from flwr.app import ArrayRecord

from fadal_testing import LABELS, write_site
from fadal.config import FederationConfig, SiteSpec, TrainConfig
from fadal_testing import tiny_plan
from fadal.federated.site_task import SiteRuntime, local_train
from fadal.federated.rounds import train_config_record
from fadal.model.losses import ConditionalDistillationLoss
from fadal.model.net import build_network

TINY = TrainConfig(seed=2)
PLAN = tiny_plan((4, 8), spacing_mm=8.0)


def _batch(seed=0):
    """2 cases, 4 classes (bg, A, B, C), 5x4x3 voxels. Case 0 drew A only, case 1 drew A and B."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 4, 5, 4, 3, generator=g)
    teacher = torch.randn(2, 4, 5, 4, 3, generator=g)
    target = torch.zeros(2, 1, 5, 4, 3, dtype=torch.long)
    target[:, :, :2] = 1  # organ A drawn on the first two slabs of both cases
    target[1, :, 4] = 2  # organ B drawn in case 1
    known = torch.tensor([[True, True, False, False], [True, True, True, False]])
    return student, teacher, target, known


def test_distillation_is_zero_when_local_model_equals_global():
    student, _, target, known = _batch()
    loss = ConditionalDistillationLoss(temperature=2.0)(student, student.clone(), target, known)
    assert abs(float(loss)) < 1e-6


def test_distillation_is_zero_on_a_site_that_drew_every_organ():
    student, teacher, target, _ = _batch()
    known = torch.ones(2, 4, dtype=torch.bool)
    assert float(ConditionalDistillationLoss()(student, teacher, target, known)) == 0.0


def test_distillation_gradients_touch_only_the_background_conditional():
    student, teacher, target, known = _batch(1)
    student.requires_grad_(True)
    # Make the teacher predict organ A (drawn by both cases) at one background voxel: masked out.
    teacher = teacher.clone()
    teacher[0, 1, 3, 0, 0] = 50.0
    loss = ConditionalDistillationLoss(temperature=2.0)(student, teacher, target, known)
    assert float(loss) > 0
    loss.backward()
    grad = student.grad
    group = ~known
    group[:, 0] = True  # G = background + organs the case did not draw
    for b in range(2):
        # Drawn organs' channels get no gradient at all.
        assert torch.all(grad[b, ~group[b]] == 0)
        # Within G the gradient sums to zero per voxel: only the conditional split inside G moves,
        # not how much probability G holds against the drawn organs.
        assert torch.allclose(grad[b, group[b]].sum(0), torch.zeros_like(grad[b, 0]), atol=1e-7)
    # Voxels of drawn organs, and the voxel where the teacher predicts a drawn organ, are untouched.
    drawn = (target[:, 0] > 0)
    assert torch.all(grad.permute(1, 0, 2, 3, 4)[:, drawn] == 0)
    assert torch.all(grad[0, :, 3, 0, 0] == 0)
    # Background voxels away from the teacher's false positive do get gradient.
    assert grad[0, :, 3, 1, 0].abs().sum() > 0


def test_distillation_moves_student_conditional_toward_teacher_only():
    student, teacher, target, known = _batch(2)
    start = student.clone()
    student = student.clone().requires_grad_(True)
    fn = ConditionalDistillationLoss(temperature=1.0)
    opt = torch.optim.SGD([student], lr=20.0)  # the loss is a mean over ~50 voxels
    before = float(fn(student, teacher, target, known))
    for _ in range(100):
        opt.zero_grad()
        fn(student, teacher, target, known).backward()
        opt.step()
    assert float(fn(student, teacher, target, known)) < 0.2 * before
    # Drawn organ A's logits never moved (nor did case 1's organ B); what moved is the split of
    # background vs the organs a case did not draw.
    assert torch.equal(student.detach()[:, 1], start[:, 1]) and torch.equal(student.detach()[1, 2], start[1, 2])
    assert not torch.equal(student.detach()[0, 2], start[0, 2])


def partial_site(root, n_labeled=2, n_test=1):
    """A site that drew organA only: organB's voxels are background in its label maps."""
    write_site(root, n_labeled=n_labeled, n_unlabeled=0, n_test=n_test)
    cases = {}
    for folder in ("labelsTr", "labelsTs"):
        for path in sorted((root / folder).glob("*.nii.gz")):
            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img)
            arr[arr == 2] = 0
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            sitk.WriteImage(out, str(path))
            cases[path.name[: -len(".nii.gz")]] = {"annotated": ["organA"]}
    json.dump(cases, open(root / "cases.json", "w"))
    return root


def _train_message(cfg: FederationConfig, model):
    from flwr.app import Message, RecordDict

    record = train_config_record(cfg, LABELS, cfg.plan)
    record["server-round"] = 1
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": record}),
                   dst_node_id=1, message_type="train")


def test_condist_changes_training_only_where_organs_are_missing(tmp_path):
    partial = partial_site(tmp_path / "partial")
    full = write_site(tmp_path / "full", n_labeled=2, n_unlabeled=0, n_test=0)
    torch.manual_seed(0)
    model = build_network(3, PLAN.network)
    out = {}
    for mode in ("marginal", "condist"):
        cfg = FederationConfig(sites=[SiteSpec(name="p", data=partial)], train=TINY, plan=PLAN,
                               partial_label_mode=mode, distill_weight=5.0)
        for name, path in (("partial", partial), ("full", full)):
            runtime = SiteRuntime(name, path, None, False, tmp_path / f"cache_{name}_{mode}")
            reply = local_train(_train_message(cfg, model), runtime)
            out[mode, name] = reply.content["arrays"].to_torch_state_dict()
    diff_partial = max(float((out["marginal", "partial"][k] - out["condist", "partial"][k]).abs().max())
                       for k in out["marginal", "partial"])
    diff_full = max(float((out["marginal", "full"][k] - out["condist", "full"][k]).abs().max())
                    for k in out["marginal", "full"])
    assert diff_partial > 1e-5, "distillation did not change the partially-annotated site's training"
    assert diff_full == 0.0, "a site that drew every organ must train exactly as without distillation"


def test_condist_federation_two_rounds(tmp_path):
    from fadal.federated.simulation import simulate

    sites = [write_site(tmp_path / "full", n_labeled=2, n_unlabeled=0, n_test=1), partial_site(tmp_path / "partial")]
    cfg = FederationConfig(
        sites=[SiteSpec(name=p.name, data=p) for p in sites], rounds=2, local_steps=2, train=TINY,
        plan=PLAN, partial_label_mode="condist", distill_weight=1.0, evaluate_every=2, out=tmp_path / "run",
    )
    history = simulate(cfg)
    rounds = [r for r in history.rounds if r.loss is not None]
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.sites == 2 and r.failures == 0 and np.isfinite(r.loss) for r in rounds)
    assert "organA" in rounds[-1].dice and "organB" in rounds[-1].dice
    assert history.config["partial_label_mode"] == "condist"
