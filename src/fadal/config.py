"""Configuration as data: pydantic models for every stage, loaded from YAML.

Each field's description is the documentation of that setting; ``fadal <cmd> --help`` and the README
point here. Unknown keys are errors (a typo in a hospital's config must not be silently ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fadal.config_amplify import ConvexAdamConfig, FusionConfig, QCConfig  # noqa: F401  (re-exported)
from fadal.errors import FadalInputError
from fadal.records import Plan


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegistrationConfig(_Strict):
    """Atlas-to-scan registration: initial translation, then elastix (affine then B-spline, multi-resolution)."""

    method: Literal["elastix", "convexadam"] = Field(
        "elastix", description="'elastix': affine then B-spline per pair (~8 s on 128^3 with 2 threads). "
        "'convexadam': MIND-SSC features, coarse convex search, then Adam instance optimisation (see amplify/convexadam.py).")
    convexadam: ConvexAdamConfig = ConvexAdamConfig()
    resolutions: int = Field(3, ge=1, le=5, description="Pyramid levels for both stages.")
    affine_iterations: int = Field(128, ge=1)
    bspline_iterations: int = Field(128, ge=1)
    grid_spacing_mm: float = Field(24.0, gt=0, description="B-spline control point spacing (mm).")
    metric: Literal["AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation", "AdvancedMeanSquares"] = Field(
        "AdvancedMattesMutualInformation", description="Similarity metric (MI is robust to scanner HU differences)."
    )
    spatial_samples: int = Field(2048, ge=256, description="Random samples per iteration (2048 gave the same Dice as 4096 at a third of the time).")
    workers: int = Field(2, ge=1, description="Registrations run at once (each with one ITK thread).")
    seed: int = 0
    initialization: Literal["search", "center_of_gravity", "geometric_center"] = Field(
        "search",
        description="Starting translation before the affine stage. 'geometric_center' aligns the image centres; "
        "'center_of_gravity' the centres of the body masks; 'search' (default) tries craniocaudal offsets every "
        "init_step_mm (then half and quarter steps) over the placements of the shorter scanned body length within the "
        "longer, in-plane aligning the common body slab, and keeps the best NCC on init_coarse_mm images: survives "
        "scans that cover different body lengths at different places in their field of view.",
    )
    init_step_mm: float = Field(10.0, gt=0, description="Craniocaudal step of the 'search' initialisation (mm).")
    init_coarse_mm: float = Field(8.0, gt=0, description="Voxel size of the images the 'search' initialisation scores (mm).")
    use_body_masks: bool = Field(True, description="Restrict elastix's metric to the body (HU > -500, largest "
                                 "component, closed, holes filled) of both scans, so table and air do not drive it.")
    mask_margin_mm: float = Field(10.0, ge=0, description="The body masks are grown by this margin: the skin must "
                                  "lie inside both, or the metric cannot see one scan's body bulge out of the other's "
                                  "(measured: body Dice 0.93 with exact masks, 0.985 with 10 mm).")
    min_body_dice: float = Field(0.3, ge=0, le=1, description="Failed registration below this Dice of the fixed and "
                                 "warped atlas body masks, in the stretch the atlas covers. A floor for the absurd: "
                                 "measured on OpenKBP, pairs whose warped labels were as good as the median had "
                                 "0.39-0.99 (0.8, the former default, rejected 22 % of them), flipped atlases 0.39-0.97 "
                                 "(benchmarks/registration_calibration.py).")
    min_ncc: float = Field(0.3, ge=-1, le=1, description="Failed registration below this NCC of fixed and warped atlas "
                           "scan in the fixed body, in the stretch the atlas covers (measured on OpenKBP: good pairs "
                           "0.32-0.87, flipped atlases -0.10-0.55; phantom: good 0.58-0.85, upside-down 0.15-0.26).")
    min_ncc_ratio: float = Field(0.8, ge=0, le=1, description="Failed registration when its NCC is below this fraction "
                                 "of the best atlas's NCC on the same scan (measured on OpenKBP: passes 98 % of the "
                                 "pairs whose warped labels are as good as the median, catches every flipped atlas).")
    min_overlap: float = Field(0.5, ge=0, le=1, description="Failed registration if the warped atlas still covers "
                               "less than this fraction of the fixed body it covered after the initial translation.")




class PlannerConfig(_Strict):
    """How the planner turns fingerprints into a :class:`Plan` (see plan/planner.py)."""

    budget_minutes: float = Field(25.0, gt=0, description="Training time the plan is sized for: the patch is capped "
                                  "so that the budget holds at least min_steps optimiser steps.")
    min_steps: int = Field(800, ge=1, description="Optimiser steps the budget must hold at least.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device the plan is sized for.")
    spacing_mm: tuple[float, float, float] | None = Field(None, description="Override the planned target spacing.")
    patch_size: tuple[int, int, int] | None = Field(None, description="Override the planned patch size.")
    channels: tuple[int, ...] | None = Field(None, description="Override the planned network channels.")
    architecture: Literal["unet", "dynunet"] | None = Field(None, description="Override the planned architecture.")
    batch_size: int = Field(2, ge=1)
    max_patch_side: int = Field(160, ge=16, description="No patch side larger than this (voxels).")
    mirror: bool = Field(False, description="Mirror patches left/right (swapping paired left/right labels, found by "
                         "name). Off by default: lateral organs without a pair (liver, spleen) would learn to appear "
                         "on either side.")
    crop_to_body: bool = True


class AugmentConfig(_Strict):
    """nnU-Net-style augmentation of each training patch (MONAI transforms; probabilities per patch)."""

    enabled: bool = True
    spatial_prob: float = Field(0.2, ge=0, le=1, description="Random rotation (up to rotate_deg) and scaling.")
    rotate_deg: float = Field(15.0, ge=0)
    scale_range: float = Field(0.15, ge=0, lt=1, description="Scale factor drawn in [1-s, 1+s] per axis.")
    noise_prob: float = Field(0.1, ge=0, le=1, description="Gaussian noise (std up to 0.03 of the HU window).")
    blur_prob: float = Field(0.1, ge=0, le=1, description="Gaussian blur (sigma 0.5-1 voxel).")
    brightness_prob: float = Field(0.15, ge=0, le=1, description="Multiplicative intensity in [0.75, 1.25].")
    gamma_prob: float = Field(0.15, ge=0, le=1, description="Gamma in [0.7, 1.5] (contrast).")
    mirror_prob: float = Field(0.5, ge=0, le=1, description="Left/right mirroring, only when the plan has mirror_pairs.")


class TrainConfig(_Strict):
    """How the network is optimised (the same engine for local, pooled, federated and self-training)."""

    steps: int = Field(1000, ge=1, description="Optimiser steps of local/pooled training (a federation gives each "
                       "site local_steps per round instead).")
    minutes: float | None = Field(None, gt=0, description="Wall-clock budget: training stops when it is spent (or at "
                                  "`steps`), and the learning-rate schedule follows the elapsed time.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = Field("poly", description="Learning-rate decay over the run: "
                                                            "'poly' lr*(1-t)^0.9 (nnU-Net), 'cosine', or none.")
    foreground_fraction: float = Field(0.67, ge=0, le=1, description="Share of patches centred on a voxel of an "
                                       "organ the case drew (see foreground_balance); the rest are centred anywhere.")
    foreground_balance: Literal["case", "dataset"] = Field(
        "dataset", description="How the organ of a foreground patch is chosen: 'dataset' uniformly among all organs any "
        "case annotated, then a case that drew it (on OpenKBP, where 59 of 170 cases draw the esophagus, this took its "
        "Dice from 0.00 to 0.57); 'case' uniformly among the organs the drawn case annotated.")
    amplified_weight: float = Field(1.0, gt=0, description="How often a pseudo-labeled scan is drawn relative to "
                                    "a real annotation (1 = as often; 0.5 = half as often).")
    augment: AugmentConfig = AugmentConfig()
    confidence_threshold: float = Field(
        0.7, ge=0, le=1, description="Amplified-label voxels with lower fusion confidence are ignored by the loss."
    )
    amp: bool = Field(True, description="Mixed precision (and channels-last) when CUDA is present (ignored on CPU).")
    seed: int = 0
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = leave torch's default.")


def _coarse_registration() -> "RegistrationConfig":
    # Synthesis registers on the network's coarse grid (e.g. 6 mm): two levels and few iterations
    # suffice there, and one pair then takes about a second.
    return RegistrationConfig(resolutions=2, affine_iterations=64, bspline_iterations=64, spatial_samples=1024,
                              grid_spacing_mm=30.0, workers=1)


class SynthesisConfig(_Strict):
    """Synthetic labeled pairs from learned transforms (Zhao et al., CVPR 2019; see amplify/synthesize.py)."""

    registration: RegistrationConfig = Field(
        default_factory=_coarse_registration,
        description="Atlas -> unlabeled registration on the preprocessed grid; its deformation fields are the "
        "spatial transforms that get sampled. Its failure thresholds (min_ncc, min_body_dice) drop failed ones.")
    max_targets: int = Field(8, ge=1, description="Unlabeled scans per atlas whose transforms are learned.")
    appearance: Literal["field", "none"] = Field(
        "field", description="'field': additive intensity field (target brought back into the atlas frame minus "
        "the atlas, smoothed); 'none': spatial transforms only.")
    appearance_sigma_mm: float = Field(
        12.0, gt=0, description="Gaussian smoothing of the appearance field: it carries contrast/scanner "
        "differences, not the target's (misregistered) edges.")
    appearance_max: float = Field(0.2, ge=0, description="Clip of the appearance field (windowed intensity units, 1 = the HU window).")
    appearance_scale: tuple[float, float] = Field(
        (0.0, 1.0), description="Each draw scales its appearance field by a factor drawn uniformly in this range.")
    fraction: float = Field(0.5, ge=0, lt=1, description="Share of synthetic pairs among the training samples.")
    seed: int = 0


class SelfTrainConfig(_Strict):
    """Self-training with quality control (see amplify/selftrain.py)."""

    rounds: int = Field(1, ge=1, description="Predict -> refine -> retrain cycles.")
    model_confidence: float = Field(
        0.9, gt=0, le=1, description="Where model and fusion disagree, the model's label is kept if its "
        "probability is at least this; otherwise the voxel is dropped (confidence 0).")
    min_volume_ratio: float = Field(0.5, gt=0, description="QC: a refined organ smaller than this x the fused one "
                                    "goes back to the fusion's label for that scan.")
    max_volume_ratio: float = Field(2.0, gt=1, description="QC: a refined organ larger than this x the fused one "
                                    "goes back to the fusion's label for that scan.")
    qc: QCConfig = Field(default_factory=QCConfig, description="The amplification QC (amplify/qc.py), applied to "
                         "refined labels too: implausible organs are demoted, implausible scans rejected.")
    fresh_model: bool = Field(True, description="Each round trains a new network (no confirmation bias from "
                              "the previous weights); False fine-tunes the previous round's network.")
    model: Path | None = Field(None, description="`fadal amplify`: a trained checkpoint (e.g. a federation's "
                               "global_model.pt) that refines once, no retraining; None = train one at the site "
                               "(`train`) on its real + fused (+ synthetic) labels, then `rounds` refine/retrain cycles.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="`fadal amplify` without `model`: the "
                               "site's own training runs.")


class AmplifyConfig(_Strict):
    """`fadal amplify --config amplify.yaml`: fusion, then (optionally) synthesis, then self-training (amplify/chain.py)."""

    registration: RegistrationConfig = RegistrationConfig()
    fusion: FusionConfig = FusionConfig()
    qc: QCConfig = QCConfig()
    max_atlases: int = Field(5, ge=1, description="Use at most this many labeled scans as atlases.")
    synthesis: SynthesisConfig | None = Field(None, description="Second stage: learn each atlas's spatial and "
                                              "appearance transforms from the unlabeled scans (cached at the site; "
                                              "training draws new pairs from them). None = no synthesis.")
    selftrain: SelfTrainConfig | None = Field(None, description="Third stage: refine the pseudo-labels with a "
                                              "trained network, QC'd. None = no self-training.")
    plan: Path | None = Field(None, description="plan.json (`fadal plan`, e.g. the federation's) whose grid synthesis "
                              "learns on; None = the self-training model's plan, else planned from this site.")
    planner: PlannerConfig = PlannerConfig()


class SitePolicy(_Strict):
    """A hospital's own privacy policy (`fadal site --policy site_policy.yaml`; in simulation `sites[].policy`).

    The site checks every message against it before any work (federated/policy.py): a message asking
    for less privacy or more compute than it allows is refused with an error, never adjusted or
    silently followed. The defaults allow everything, so an empty policy changes nothing."""

    dp_required: bool = Field(False, description="Train only with client-side DP: dp-clip > 0 and a noise "
                              "multiplier > 0 (and >= min_noise_multiplier).")
    min_noise_multiplier: float = Field(0.0, ge=0, description="Smallest dp-noise-multiplier accepted; > 0 implies "
                                        "dp_required.")
    max_clip: float | None = Field(None, gt=0, description="Largest dp-clip accepted (the noise is relative to it).")
    epsilon_budget: float | None = Field(None, gt=0, description="This site's total epsilon over every round of "
                                         "every run (the ledger): a training message whose release would exceed it is "
                                         "refused. Implies dp_required.")
    epsilon_delta: float = Field(1e-5, gt=0, lt=1, description="Delta at which the ledger's epsilon is computed.")
    ledger: Path | None = Field(None, description="The epsilon ledger (JSON, mode 0600); default "
                                "CACHE/privacy_ledger.json in the site's local state folder.")
    secure_aggregation_required: bool = Field(False, description="Answer training only through SecAgg+: a plain "
                                              "train message (the model in the clear) is refused.")
    min_reconstruction_threshold: int = Field(0, ge=0, description="SecAgg+: refuse a set-up whose reconstruction "
                                              "threshold (sites that must collude to rebuild this site's mask) is "
                                              "lower (never below 2 in any case).")
    local_norm_required: bool = Field(False, description="FedBN: the normalisation layers never leave the site; a "
                                      "train message without local-norm is refused.")
    evaluation_metrics: bool = Field(True, description="Answer federated evaluation (Dice on the site's held-out "
                                     "cases); false: evaluate messages are refused.")
    fingerprint: bool | None = Field(None, description="Answer the planning query with the dataset fingerprint; "
                                     "None = yes unless DP is required (the fingerprint is not noised).")
    max_local_steps: int | None = Field(None, ge=1, description="Most optimiser steps per round.")
    max_patch_voxels: int | None = Field(None, ge=1, description="Most voxels in one patch (plan.patch_size).")
    max_batch_voxels: int | None = Field(None, ge=1, description="Most voxels in one batch (patch x batch_size).")
    max_parameters: int | None = Field(None, ge=1, description="Most parameters of the network the plan describes.")
    max_threads: int | None = Field(None, ge=1, description="Most torch CPU threads; a message asking for 0 "
                                    "(torch's default) gets this many.")
    allowed_app_bundles: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=list, description="SHA-256 (hex) of app bundles this site runs besides FADAL's own (a "
        "pyproject.toml naming fadal.federated.client_app:app and no code); any other bundle is refused "
        "(federated/app_vetting.py). The refusal in the site's log gives a bundle's hash.")

    @property
    def requires_dp(self) -> bool:
        return self.dp_required or self.min_noise_multiplier > 0 or self.epsilon_budget is not None

    @property
    def answers_fingerprint(self) -> bool:
        return (not self.requires_dp) if self.fingerprint is None else self.fingerprint

    @model_validator(mode="after")
    def _satisfiable(self) -> "SitePolicy":
        if self.local_norm_required and self.secure_aggregation_required:
            raise ValueError("local_norm_required (FedBN) and secure_aggregation_required cannot both hold: "
                             "SecAgg+ aggregates whole models")
        return self


class SiteSpec(_Strict):
    """One hospital's data as federation sees it (only the site itself ever reads these paths)."""

    name: str
    data: Path = Field(description="Site folder in nnU-Net v2 / MSD layout.")
    amplified: Path | None = Field(None, description="Output folder of `fadal amplify` for this site, if used.")
    use_amplified: bool = Field(False, description="Train on amplified pseudo-labels as well as the real labels.")
    policy: SitePolicy | None = Field(None, description="Simulation only: this site's privacy policy, as `fadal site "
                                      "--policy` gives it in a deployment.")


class FedOptConfig(_Strict):
    """Server-side optimiser of 'fedadam' / 'fedyogi' (Reddi et al., ICLR 2021; Flower's FedAdam/FedYogi)."""

    eta: float = Field(1e-2, gt=0, description="Server learning rate (step applied to the averaged update).")
    beta_1: float = Field(0.9, ge=0, lt=1, description="Server momentum.")
    beta_2: float = Field(0.99, ge=0, lt=1, description="Server second-moment decay.")
    tau: float = Field(1e-3, gt=0, description="Adaptivity (added to the root of the second moment).")


class FederationConfig(_Strict):
    """`fadal federate --config fl.yaml`."""

    sites: list[SiteSpec]
    rounds: int = Field(10, ge=1)
    local_steps: int = Field(100, ge=1, description="Optimiser steps each site takes per round (the learning-rate "
                             "schedule runs over rounds x local_steps).")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "cyclic"] = Field(
        "fedavg", description="Aggregation strategy: 'fedavg'; 'fedprox' (sites add the proximal term proximal_mu/2 "
        "|w - w_global|^2); 'cyclic' (one site per round, in turn, trains the global model: give it sites x the rounds "
        "for the same steps); 'fedadam'/'fedyogi' (server-side adaptive optimiser, see fedopt); 'fedbn' (normalisation "
        "layers stay at each site and are never sent; the network gets affine instance norm unless plan.network.norm "
        "says otherwise).")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight (used by strategy 'fedprox' only).")
    fedopt: FedOptConfig = FedOptConfig()  # fedadam/fedyogi
    server_lr: float = Field(1.0, gt=0, description="fedavg/fedprox/fedbn: the global model moves by server_lr x the "
                             "averaged update (Flower's FedAvgM; 1 = plain averaging; 3 collapsed OpenKBP runs, README).")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="FedAvgM's server momentum (0 = none).")
    transfer_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Sites send their arrays as float16 to halve upload size; the server averages in float32."
    )
    partial_label_mode: Literal["marginal", "condist"] = Field(
        "marginal",
        description="Organs a site did not draw: 'marginal' (loss merges them into background); 'condist' adds "
        "ConDistFL conditional distillation from the received global model on the site's background voxels.",
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the ConDistFL distillation term ('condist').")
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation ('condist').")
    dp_clip: float | None = Field(
        None, gt=0, description="Client-side differential privacy: each site clips its update (local - global) to this "
        "L2 norm and adds Gaussian noise (dp_noise_multiplier x dp_clip) before sending. None = off.")
    dp_noise_multiplier: float = Field(1.0, ge=0, description="Noise standard deviation in units of dp_clip.")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="Delta at which epsilon is reported in the history.")
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(0, ge=0, description="Minimum sites per round (0 = all configured sites).")
    evaluate_every: int = Field(1, ge=0, description="Sites score the global model on their held-out cases every N rounds (0 = never; otherwise also after the last round).")
    labels: dict[str, int] | None = Field(None, description="The federation's label set (default: the first site's dataset.json).")
    train: TrainConfig = TrainConfig()
    synthesis: SynthesisConfig | None = Field(None, description="Each site also trains on synthetic pairs drawn on the "
                                              "fly from its own learned transforms (cached at the site: its amplified "
                                              "folder's synthesis/, else its cache), a share `fraction` of its samples.")
    selftrain_every: int = Field(0, ge=0, description="K rounds after its last refinement (from round K+1; when next "
                                 "asked under cyclic) a site refines its pseudo-labels with the global model it received "
                                 "(QC'd, on-site) and trains on them from then on; 0 = never.")
    selftrain: SelfTrainConfig = Field(default_factory=SelfTrainConfig, description="How sites refine (`model_confidence`, "
                                       "volume ratios, `qc`); its training fields are unused here.")
    plan: Plan | None = Field(None, description="The network's plan; None = planned at the start of the run from the "
                              "sites' merged fingerprints (each site sends aggregate statistics only).")
    planner: PlannerConfig = PlannerConfig()
    out: Path = Field(Path("runs/federated"), description="Checkpoints, history and report go here.")
    resume: bool = Field(True, description="If `out` holds an unfinished run (global_model.pt of round r < rounds, and "
                         "history.json), continue from round r+1 with its weights and history instead of starting over.")
    round_timeout: float = Field(3600.0, gt=0, description="Seconds a round waits for the sites' replies; a site that "
                                 "has not answered by then counts as failed for that round.")
    simulation_backend: Literal["in-process", "ray"] = Field(
        "in-process", description="Flower simulation engine backend: 'in-process' runs the sites' ClientApps one after "
        "the other in this process (no Ray start, ~30 s here); 'ray' is Flower's default (Ray actors, one at a time "
        "with every core and GPU here as well). Deployment is unaffected.")
    join_timeout: float = Field(120.0, gt=0, description="Seconds the coordinator waits, before planning and before the "
                                "first round, for every site to connect; after it a round starts with the sites "
                                "connected (at least `min_sites`).")
    secure_aggregation: bool = Field(
        False, description="Flower SecAgg+: each site masks its (example-weighted, quantised) model with pairwise and "
        "private masks, so the coordinator only ever sees masked vectors and their weighted mean. Use when the "
        "coordinator must not see any single site's model. Works with 'fedavg'/'fedprox' (optionally with dp_clip "
        "and 'condist'); not with 'fedadam'/'fedyogi'/'fedbn' or transfer_dtype float16.")
    secagg_num_shares: int = Field(
        0, ge=0, description="SecAgg+: sites that hold a share of each site's secrets (its neighbours, itself "
        "included); 0 = every sampled site (plain SecAgg, fine for a few hospitals). Fewer (>= 3, odd) cuts the "
        "key-sharing cost in large federations.")
    secagg_reconstruction_threshold: int = Field(
        0, ge=0, description="SecAgg+: shares needed to rebuild a site's mask; 0 = two thirds of the shares (at "
        "least 2). Higher = more sites must collude to unmask one site; lower = more dropped sites are tolerated.")
    secagg_clipping_range: float = Field(
        8.0, gt=0, description="SecAgg+: every model value must lie in [-r, r] to be quantised (a site refuses to "
        "send, with an error, if not). Smaller r = finer quantisation.")
    secagg_max_weight: float = Field(
        100.0, gt=0, description="SecAgg+: the largest num-examples (training volumes) a site may report; each site "
        "scales its model by num-examples / max_weight before quantising, so keep it near the real maximum: the "
        "aggregate's quantisation error grows with max_weight / num-examples.")
    secagg_quantization_bits: int = Field(
        24, ge=8, le=30, description="SecAgg+: values are quantised to 2**bits levels over [-r, r]; the masked sum "
        "lives modulo 2**32, so sites x 2**bits must stay below 2**32.")

    @model_validator(mode="after")
    def _fedbn_needs_local_norm_parameters(self) -> "FederationConfig":
        # FedBN keeps the normalisation layers' learned parameters at each site; plain instance norm
        # has none, so 'fedbn' switches to affine instance norm (documented on `strategy`).
        if self.plan is not None:
            self.plan = self.plan_for_strategy(self.plan)
        return self

    def plan_for_strategy(self, plan: Plan) -> Plan:
        """``plan`` as this federation's strategy needs it ('fedbn': affine instance norm instead of plain)."""
        if self.strategy == "fedbn" and plan.network.norm == "instance":
            return plan.model_copy(update={"network": plan.network.model_copy(update={"norm": "instance-affine"})})
        return plan

    @model_validator(mode="after")
    def _server_step_fits(self) -> "FederationConfig":
        fedavgm = self.server_lr != 1.0 or self.server_momentum
        if fedavgm and (self.secure_aggregation or self.strategy in ("fedadam", "fedyogi", "cyclic")):
            raise ValueError(f"server_lr/server_momentum are FedAvgM's: not for {self.strategy!r} or secure_aggregation")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> "FederationConfig":
        if not self.secure_aggregation:
            return self
        if self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"secure_aggregation supports strategy 'fedavg' or 'fedprox', not {self.strategy!r} "
                             "(SecAgg+ hands the server only the weighted mean of full models)")
        if self.transfer_dtype != "float32":
            raise ValueError("secure_aggregation sends quantised integers: transfer_dtype must stay 'float32'")
        if len(self.sites) < 2:
            raise ValueError("secure_aggregation needs at least 2 sites (a mean of one site is that site's model)")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares and not 3 <= shares <= len(self.sites):
            raise ValueError(f"secagg_num_shares must be 0 (all sites) or between 3 and the {len(self.sites)} sites, "
                             f"not {shares}")
        if threshold == 1 or threshold > (shares or len(self.sites)) or (shares and threshold >= shares):
            raise ValueError(f"secagg_reconstruction_threshold {threshold} must be 0 (default) or >= 2 and below "
                             f"secagg_num_shares ({shares or 'all'} of {len(self.sites)} sites)")
        if len(self.sites) * 2 ** self.secagg_quantization_bits >= 2 ** 32:
            raise ValueError(f"secagg_quantization_bits {self.secagg_quantization_bits} overflows the masked sum of "
                             f"{len(self.sites)} sites (sites x 2**bits must stay below 2**32)")
        return self


class TrainRunConfig(_Strict):
    """`fadal train --config train.yaml`: pooled (several sites) or local (one site) training."""

    sites: list[SiteSpec] = Field(default_factory=list, description="Sites to pool (`--site` adds more).")
    out: Path = Field(Path("runs/train"), description="model.pt, plan.json and history.json go here.")
    train: TrainConfig = TrainConfig()
    plan: Plan | None = Field(None, description="None = planned from the sites' fingerprints.")
    planner: PlannerConfig = PlannerConfig()


def load_yaml(model: type[BaseModel], path: str | Path) -> BaseModel:
    """Load and validate a YAML config; errors name the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise FadalInputError(f"{path}: config file not found") from err
    except yaml.YAMLError as err:
        raise FadalInputError(f"{path}: not valid YAML ({err})") from err
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise FadalInputError(f"{path}: invalid config: {problems}") from err
    # Relative paths in a config are relative to the config file, not to the shell's folder.
    if isinstance(cfg, (FederationConfig, TrainRunConfig)):
        for site in cfg.sites:
            site.data = _rel(site.data, path.parent)
            if site.amplified is not None:
                site.amplified = _rel(site.amplified, path.parent)
            if site.policy is not None and site.policy.ledger is not None:
                site.policy.ledger = _rel(site.policy.ledger, path.parent)
        cfg.out = _rel(cfg.out, path.parent)
    if isinstance(cfg, SitePolicy) and cfg.ledger is not None:
        cfg.ledger = _rel(cfg.ledger, path.parent)
    if isinstance(cfg, AmplifyConfig):
        if cfg.plan is not None:
            cfg.plan = _rel(cfg.plan, path.parent)
        if cfg.selftrain is not None and cfg.selftrain.model is not None:
            cfg.selftrain.model = _rel(cfg.selftrain.model, path.parent)
    return cfg


def _rel(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()
