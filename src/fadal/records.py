"""Typed records that stages hand each other (written by one stage, read by the next).

Each top-level record carries a ``schema_version``; a reader gets exactly what the writer wrote,
validated (:func:`fadal.data.io.read_record`), never a dictionary read with ``.get(..., default)``.
Nothing has been released: a changed record bumps its ``schema_version``, and no reader keeps a
branch for older files.

* :class:`Plan` (with :class:`PreprocessConfig`, :class:`NetworkConfig`): planner -> training, every
  checkpoint, inference; a site's :class:`Fingerprint`: site -> planner.
* :class:`FusionProvenance` / :class:`SelfTrainProvenance` (``provenance/<case>.json``, one per
  pseudo-labeled scan) and :class:`AmplificationReport` (``amplification.json``: the fusion's :class:`AmplificationSummary`,
  synthesis, self-training): amplification -> training, self-training, the report.
* :class:`FederationHistory` of :class:`RoundEntry` (a federation's ``history.json``): the server
  loops -> resume, the report, the demo.

Fields that depend on how far a stage got are ``None`` when it did not get there (a rejected scan has
no confidence; a round without federated evaluation has no Dice); every other field is always written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Record(BaseModel):
    # NaN (a diverged loss) is written as NaN, as json.dumps does, so it reads back as NaN, not None.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Percentiles(_Record):
    """p10 / p50 / p90 of a quantity, one value per world axis (x, y, z of the canonical orientation)."""

    p10: tuple[float, float, float]
    p50: tuple[float, float, float]
    p90: tuple[float, float, float]


class IntensityStats(_Record):
    """HU statistics of the voxels inside drawn organs (nnU-Net's CT normalisation uses these)."""

    p00_5: float
    p50: float
    p99_5: float
    mean: float
    std: float


class Fingerprint(_Record):
    """What a site says about its data to plan the network: aggregate statistics only.

    No per-case value is in it (no case ids, no per-case spacing list, no per-case volume): spacing
    and body extent as percentiles over the site's scans, HU as percentiles over voxels pooled from
    every labeled scan, organ volumes as a range. In a federation each site sends its own and the
    coordinator merges them (:func:`fadal.plan.fingerprint.merge_fingerprints`), as FednnU-Net does.
    """

    schema_version: int = 1
    sites: int = Field(1, ge=1, description="How many site fingerprints were merged into this one.")
    scans: int = Field(ge=1, description="Scans measured (labeled and unlabeled).")
    labeled_scans: int = Field(ge=0)
    spacing_mm: Percentiles
    body_extent_mm: Percentiles = Field(description="Extent of the body's bounding box (voxels above the body "
                                        "threshold), per axis, in mm.")
    foreground_hu: IntensityStats | None = Field(None, description="None when no scan is labeled.")
    organ_volume_ml: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Organ -> (smallest, largest) volume over the scans that drew it (ml).")


class PreprocessConfig(_Record):
    """How every CT is brought to the network's space (MONAI transforms, see data/preprocess.py)."""

    spacing_mm: tuple[float, float, float] = Field((4.0, 4.0, 4.0), description="Target voxel spacing (mm).")
    hu_window: tuple[float, float] = Field((-200.0, 300.0), description="HU range mapped to [0, 1] (abdominal soft tissue).")
    orientation: str = Field("RAS", description="Canonical axis codes the network sees.")
    crop_to_body: bool = Field(True, description="Crop every volume to the bounding box of its voxels above "
                               "body_threshold_hu (plus a margin) before resampling; the prediction is padded back "
                               "(background) onto the input grid. Most of a CT's field of view can be air (an OpenKBP "
                               "head-and-neck scan's body box is 14-43 % of its volume): the network need not see it.")
    body_threshold_hu: float = Field(-500.0, description="HU above which a voxel counts as body (or table) for "
                                     "crop_to_body.")


class NetworkConfig(_Record):
    """The segmentation network (MONAI). Part of the :class:`Plan`: it travels with every checkpoint."""

    architecture: Literal["unet", "dynunet"] = Field(
        "unet", description="'unet': MONAI UNet with residual units; its first convolution is strided, so no layer "
        "works at full resolution (measured on 2 CPU cores, 2 x 96x64x96 patches: 1.8 s a step for 16..256 channels "
        "against 17 s for a DynUNet 16..256, whose two full-resolution convolutions dominate). 'dynunet': the nnU-Net "
        "architecture (MONAI DynUNet) with deep supervision, the planner's choice on a GPU.")
    channels: tuple[int, ...] = Field((16, 32, 64, 128, 256), description="Feature channels per level (the number of "
                                      "levels is the network's depth: patches are multiples of 2**(levels-1)).")
    res_units: int = Field(2, ge=0, description="'unet': residual units per level.")
    deep_supervision: int = Field(2, ge=0, description="'dynunet': extra outputs at coarser decoder levels whose loss "
                                  "is added with weights 1/2, 1/4, ... (0 = off).")
    norm: Literal["instance", "instance-affine", "batch"] = Field(
        "instance",
        description="Normalisation layers: 'instance' (no learned parameters; nothing scanner-specific is averaged "
        "across sites), 'instance-affine' (per-channel learned scale/shift; what strategy 'fedbn' keeps at each "
        "site) or 'batch'.",
    )

    @property
    def divisor(self) -> int:
        """Every patch side must be a multiple of this (the network halves it levels-1 times)."""
        return 2 ** (len(self.channels) - 1)


class Plan(_Record):
    """Everything that fixes how data reach the network and what the network is: made by the planner from
    the sites' fingerprints (``fadal plan``), stored in every checkpoint, used by training and inference.
    Editable like nnU-Net's plans: a hand-edited plan is validated the same way."""

    schema_version: int = 1
    preprocess: PreprocessConfig = PreprocessConfig()
    network: NetworkConfig = NetworkConfig()
    patch_size: tuple[int, int, int] = Field((96, 96, 96), description="Training patch and sliding-window size "
                                             "(voxels of preprocess.spacing_mm, canonical x, y, z).")
    batch_size: int = Field(2, ge=1, description="Patches per optimiser step.")
    mirror_pairs: list[tuple[int, int]] = Field(
        default_factory=list, description="Label values swapped when a patch is mirrored left/right (e.g. left and "
        "right parotid). Empty: no mirroring (an abdomen's liver and spleen have no mirror image).")
    fingerprint: Fingerprint | None = Field(None, description="The (merged) fingerprint the plan was made from.")
    notes: list[str] = Field(default_factory=list, description="Why the planner chose what it chose.")

    @model_validator(mode="after")
    def _patch_fits_network(self) -> "Plan":
        k = self.network.divisor
        if any(p % k for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be multiples of {k} for a network of "
                             f"{len(self.network.channels)} levels")
        return self


# ------------------------------------------------------------------ amplification -> training, report

class OrganCheck(_Record):
    """QC measures of one fused organ on one scan (:func:`fadal.amplify.qc.check_pseudo_label`)."""

    volume_ml: float
    flags: list[Literal["missing", "volume", "fragmented", "low_confidence", "intensity"]]
    mean_confidence: float | None = Field(None, description="None when the organ is missing.")
    volume_range_ml: tuple[float, float] | None = Field(None, description="The atlases' range widened by "
                                                        "volume_factor; None when no atlas shows the organ.")
    largest_parts_fraction: float | None = Field(None, description="None when the organ is missing.")
    median_hu: float | None = Field(None, description="The organ's median HU on the scan; None without atlas scans.")
    hu_difference: float | None = Field(None, description="HU from the closest atlas median; None without atlas scans.")


class QCVerdict(_Record):
    """The QC decision of one pseudo-label: ``kept`` organs may be trained on, ``demoted`` ones are unknown."""

    accepted: bool
    reasons: list[str]
    organs: dict[str, OrganCheck]
    kept: list[str]
    demoted: list[str]


class RefinedQC(QCVerdict):
    """Self-training's QC (:func:`fadal.amplify.selftrain.check_refined`): ``reverted`` organs drifted from
    the fusion and went back to its label."""

    reverted: list[str]
    checker: str


class OrganStats(_Record):
    voxels: int
    mean_confidence: float | None = Field(description="Over the organ's voxels; None when it has none.")


class AtlasUse(_Record):
    """What one atlas did for one scan: its registration's measures and whether it was fused."""

    case: str
    image: str
    label: str
    annotated: list[str]
    status: Literal["used", "failed", "not_selected"]
    reason: str | None = Field(description="Why it was not used; None when used.")
    warped_label: str | None
    metric: str
    metric_before: float | None
    metric_init: float | None
    metric_after: float | None
    body_dice: float | None
    overlap: float | None
    init_translation_mm: list[float]
    seconds: float
    cached: bool


class Provenance(_Record):
    """What training reads of any pseudo-label sidecar (``provenance/<case>.json``, written last: a case
    is done once it exists). ``organs_fused`` are the organs training may trust on this scan; every
    other organ is unknown there."""

    schema_version: int = 1
    case: str
    image: str
    status: Literal["accepted", "rejected"]
    reasons: list[str]
    organs_fused: list[str]
    organs_demoted: list[str]

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


class FusionProvenance(Provenance):
    """``fadal amplify``'s sidecar (:mod:`fadal.amplify.pipeline`)."""

    source: Literal["fusion"] = "fusion"
    fusion_method: str
    atlases: list[AtlasUse]
    registration_seconds: float
    fusion_seconds: float
    config: dict[str, Any] = Field(description="The AmplifyConfig of the run, as JSON.")
    qc: QCVerdict | None = Field(description="None when every registration failed (nothing was fused).")
    organs_not_fused: list[str]
    organs: dict[str, OrganStats]
    mean_confidence: float | None = Field(description="Accepted scans only; None when rejected.")
    mean_confidence_foreground: float | None = Field(description="Accepted scans with foreground only.")


class SelfTrainProvenance(Provenance):
    """Self-training's sidecar for a refined label (:func:`fadal.amplify.selftrain.refine_site`)."""

    source: Literal["selftrain"] = "selftrain"
    round: int
    fusion: str | None = Field(description="The amplification folder refined, None without fusion.")
    organs_reverted: list[str]
    rule: dict[str, float]
    stats: dict[str, float]
    qc: RefinedQC
    seconds: float


#: Either sidecar, told apart by ``source`` (what :func:`fadal.data.io.read_record` takes to read one).
AnyProvenance = Annotated[FusionProvenance | SelfTrainProvenance, Field(discriminator="source")]


class CaseSummary(_Record):
    """One scan's line in the amplification summary (from its provenance)."""

    status: Literal["accepted", "rejected"]
    reasons: list[str]
    mean_confidence: float | None
    mean_confidence_foreground: float | None
    organs: dict[str, OrganStats] = Field(description="Accepted scans only (empty when rejected).")
    organs_demoted: list[str]
    seconds: float


class RejectedScan(_Record):
    case: str
    reasons: list[str]


class AmplificationSummary(_Record):
    """A site's ``fusion.json``: what the fusion stage made of every unlabeled scan (all of them,
    not only this run's) and what this run did."""

    schema_version: int = 1
    site: str
    n_scans: int
    n_accepted: int
    n_rejected: int
    rejected: list[RejectedScan]
    mean_confidence: dict[str, float] = Field(description="Per organ, over the accepted scans.")
    n_amplified_this_run: int
    n_atlases: int
    atlases: list[str]
    n_registrations_this_run: int
    n_failed_registrations_this_run: int
    registration_seconds_this_run: float
    total_seconds: float
    fusion_method: str
    organs_fused: list[str]
    organs_not_fused: list[str]
    per_case: dict[str, CaseSummary]


class SynthesisStage(_Record):
    """What synthesis made at a site: the atlas -> unlabeled-scan transforms training samples from."""

    atlases: list[str]
    targets: list[str]
    transforms_kept: int
    transforms_rejected: list[dict[str, str]] = Field(description="atlas, target, reason (failed registration).")
    transforms_cached: int = Field(description="Of the kept ones, loaded from the site's cache, not learned this run.")
    combinations: int = Field(description="Distinct (spatial, appearance) draws per atlas, summed.")
    spacing_mm: tuple[float, float, float] = Field(description="The plan grid the transforms live on.")
    cache: str
    seconds: float


class SelfTrainStage(_Record):
    """What self-training made at a site: per round the scans refined, accepted and rejected (and why)."""

    model: str = Field(description="The checkpoint that refined (given), or 'trained here'.")
    rounds: list[dict[str, Any]] = Field(description="Per round: round, accepted, rejected, reasons, seconds.")
    labels: str = Field(description="Folder of the last round's labels, relative to the site's output.")
    key: str = Field(description="Hash of the settings, the plan and the fusion it refined: a re-run with the same "
                     "key is not redone.")
    seconds: float


class AmplificationReport(_Record):
    """A site's ``amplification.json``: every stage ``fadal amplify`` ran, and which labels training uses."""

    schema_version: int = 2
    site: str
    fusion: AmplificationSummary
    synthesis: SynthesisStage | None = None
    selftrain: SelfTrainStage | None = None
    training_labels: str = Field(description="Folder (relative to the site's output) holding the labels/, "
                                 "confidence/ and provenance/ training reads: '.' (fusion) or the last "
                                 "self-training round's.")


# ------------------------------------------------------------------ federation -> resume, report, demo

class RoundEntry(_Record):
    """One federated round as the server recorded it. The strategy fills it in as the round goes
    (bytes down when it configures training; sites, loss, bytes up when it aggregates; Dice when it
    evaluates), so a field is None until its step ran: ``loss`` stays None in a round whose
    aggregation never happened, ``dice`` in a round without federated evaluation. Sites are
    Flower node ids, all the server knows of them."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_assignment=True)

    round: int
    sampled: int | None = None
    sites: int | None = None
    failures: int | None = None
    loss: float | None = None
    seconds: float | None = None
    train_seconds_max: float | None = None
    train_seconds_sum: float | None = None
    train_seconds_per_site: dict[str, float] | None = None
    client_seconds_sum: float | None = None
    client_seconds_per_site: dict[str, float] | None = None
    startup_seconds_per_site: dict[str, float] | None = None
    site_status: dict[str, str] | None = Field(None, description="Flower node id -> 'answered', 'failed' (an "
                                                "error reply) or 'no reply' (timed out, disconnected): the "
                                                "round's training messages.")
    bytes_down: int | None = None
    bytes_down_per_site: dict[str, int] | None = None
    bytes_up: int | None = None
    bytes_up_per_site: dict[str, int] | None = None
    transfer_dtypes: list[str] | None = None
    epsilon: float | None = Field(None, description="Cumulative DP epsilon (client-side DP only).")
    dice: dict[str, float] | None = Field(None, description="Federated evaluation: organ (and 'mean') -> Dice "
                                          "averaged over the sites that scored it.")
    eval_sites: int | None = None


class FederationHistory(_Record):
    """A federation's ``history.json``, rewritten after every round (with the round's checkpoint)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_assignment=True)

    schema_version: int = 1
    rounds: list[RoundEntry] = Field(default_factory=list)
    config: dict[str, Any] | None = Field(None, description="The FederationConfig of the run, as JSON.")
    resumed_after: list[int] = Field(default_factory=list, description="Rounds after which a restart resumed.")
    secure_aggregation: dict[str, Any] | None = Field(None, description="The SecAgg+ settings, when used.")
    privacy: dict[str, Any] | None = Field(None, description="The DP accountant's summary, with client-side DP.")

    def entry(self, server_round: int) -> RoundEntry:
        """This round's entry, added if it is not there yet."""
        for entry in self.rounds:
            if entry.round == server_round:
                return entry
        self.rounds.append(RoundEntry(round=server_round))
        return self.rounds[-1]

    def report_rounds(self) -> list[dict[str, Any]]:
        """The rounds as the report's ``history`` takes them (:func:`fadal.evaluate.report.write_report`)."""
        return [r.model_dump(exclude_none=True) for r in self.rounds]


# ------------------------------------------------------------------ training -> deployment (model package)

class GraphCheck(_Record):
    """The export-time check of a package's graph against the eager model it was made from."""

    volume: str = Field(description="The test volume the check ran on (its shape and where it came from).")
    windows: int = Field(description="Sliding windows the check volume took (more than one checks the blending).")
    max_abs_logit_diff: float = Field(description="Largest |graph - eager| over every logit of the volume.")
    tolerance: float = Field(description="The largest difference accepted.")
    labels_identical: bool = Field(description="Whether both label maps are equal voxel for voxel.")
    passed: bool


class ModelPackageManifest(_Record):
    """``manifest.json`` of a deployable model package (`fadal export`): what each file is, the plan and label
    set inference needs, and the export-time check of the graph. Read by :mod:`fadal.navigation.model_package`."""

    schema_version: int = 1
    format: Literal["fadal-model-package"] = "fadal-model-package"
    fadal_version: str
    torch_version: str
    created: str = Field(description="UTC time of the export, ISO 8601.")
    source_checkpoint: str = Field(description="File name of the checkpoint the package was exported from.")
    labels: dict[str, int]
    plan: Plan
    graph: str = Field(description="The torch.export program (.pt2; runs without FADAL's training stack).")
    graph_format: Literal["torch.export"] = "torch.export"
    graph_input_shape: tuple[int, int, int, int, int] = Field(description="(1, 1, *patch): the window it takes.")
    weights: str = Field(description="The eager weights as a FADAL checkpoint (readable by `fadal predict`).")
    sha256: dict[str, str] = Field(description="File name -> SHA-256 of every other file in the package.")
    check: GraphCheck
