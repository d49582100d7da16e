"""The site decides: every message is checked against the site's own :class:`~fadal.config.SitePolicy`.

Each check runs before any work (no data read, no network built) and refuses with a
:class:`~fadal.errors.SiteRefusal` naming a fixed rule; the coordinator gets only the rule's name
in an opaque code (:mod:`fadal.federated.site_errors`), the site's log the whole reason. Some
checks hold with no policy at all: a NaN, infinite or negative noise multiplier or clip would
silently switch the noise off, so it is always refused.
"""

from __future__ import annotations

import math

from fadal.config import SitePolicy, TrainConfig
from fadal.errors import SiteRefusal
from fadal.model.net import parameter_count
from fadal.records import Plan


def check_privacy(policy: SitePolicy | None, dp_clip: float, noise_multiplier: float) -> None:
    """The message's client-side DP settings against the policy (and against NaN/negative always)."""
    if not (math.isfinite(dp_clip) and dp_clip >= 0):
        raise SiteRefusal("dp-clip", f"dp-clip {dp_clip!r} is not a finite number >= 0")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise SiteRefusal("noise-multiplier", f"dp-noise-multiplier {noise_multiplier!r} is not a finite number >= 0")
    if policy is None:
        return
    if policy.requires_dp and not (dp_clip > 0 and noise_multiplier > 0):
        raise SiteRefusal("dp-required", f"the site requires client-side DP; the message has dp-clip {dp_clip:g}, "
                          f"dp-noise-multiplier {noise_multiplier:g}")
    if dp_clip > 0 and noise_multiplier < policy.min_noise_multiplier:
        raise SiteRefusal("min-noise-multiplier", f"dp-noise-multiplier {noise_multiplier:g} is below the site's "
                          f"minimum {policy.min_noise_multiplier:g}")
    if dp_clip > 0 and policy.max_clip is not None and dp_clip > policy.max_clip:
        raise SiteRefusal("max-clip", f"dp-clip {dp_clip:g} is above the site's maximum {policy.max_clip:g}")


def check_training(policy: SitePolicy | None, secure: bool, local_norm: bool, local_steps: int) -> None:
    """A train message: how the model leaves the site, and how long the site works on it."""
    if local_steps < 1:
        raise SiteRefusal("local-steps", f"local-steps {local_steps} is not >= 1")
    if policy is None:
        return
    if policy.secure_aggregation_required and not secure:
        raise SiteRefusal("secure-aggregation", "the site answers training only through SecAgg+; this is a plain "
                          "train message (its model would leave in the clear)")
    if policy.local_norm_required and not local_norm:
        raise SiteRefusal("local-norm", "the site keeps its normalisation layers (FedBN); the message does not "
                          "set local-norm")
    if policy.max_local_steps is not None and local_steps > policy.max_local_steps:
        raise SiteRefusal("max-local-steps", f"local-steps {local_steps} exceeds the site's cap {policy.max_local_steps}")


def check_compute(policy: SitePolicy | None, plan: Plan, train: TrainConfig, num_classes: int) -> int:
    """The network and patches a message asks for against the site's caps; returns the torch
    threads to use (0: torch's default; a message asking for 0 under a cap gets the cap)."""
    if policy is None:
        return train.num_threads
    patch = math.prod(plan.patch_size)
    if policy.max_patch_voxels is not None and patch > policy.max_patch_voxels:
        raise SiteRefusal("max-patch-voxels", f"patch {plan.patch_size} has {patch} voxels, over the site's cap "
                          f"{policy.max_patch_voxels}")
    if policy.max_batch_voxels is not None and patch * plan.batch_size > policy.max_batch_voxels:
        raise SiteRefusal("max-batch-voxels", f"batch of {plan.batch_size} x {plan.patch_size} has "
                          f"{patch * plan.batch_size} voxels, over the site's cap {policy.max_batch_voxels}")
    if policy.max_parameters is not None:
        n = parameter_count(num_classes, plan.network)
        if n > policy.max_parameters:
            raise SiteRefusal("max-parameters", f"the planned network has {n} parameters, over the site's cap "
                              f"{policy.max_parameters}")
    if policy.max_threads is None:
        return train.num_threads
    if train.num_threads > policy.max_threads:
        raise SiteRefusal("max-threads", f"num_threads {train.num_threads} exceeds the site's cap {policy.max_threads}")
    return train.num_threads or policy.max_threads


def check_evaluation(policy: SitePolicy | None) -> None:
    if policy is not None and not policy.evaluation_metrics:
        raise SiteRefusal("evaluation", "the site opted out of federated evaluation metrics")


def check_fingerprint(policy: SitePolicy | None) -> None:
    if policy is not None and not policy.answers_fingerprint:
        raise SiteRefusal("fingerprint", "the site does not send its dataset fingerprint (not DP-noised); give the "
                          "federation a plan")


def check_secagg_setup(policy: SitePolicy | None, threshold: int, shares: int) -> None:
    """SecAgg+'s set-up: how many sites must collude to rebuild this site's mask (always >= 2)."""
    least = max(2, policy.min_reconstruction_threshold if policy is not None else 0)
    if threshold < least:
        raise SiteRefusal("reconstruction-threshold", f"SecAgg+ reconstruction threshold {threshold} (of {shares} "
                          f"shares) is below the site's minimum {least}")
