"""Configuration as data: pydantic models for every stage, loaded from YAML.

Each field's description is the documentation of that setting; ``fadal <cmd> --help`` and the README
point here. Unknown keys are errors (a typo in a hospital's config must not be silently ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fadal.data.io import FadalInputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessConfig(_Strict):
    """How every CT is brought to the network's space (MONAI transforms, see data/preprocess.py)."""

    spacing_mm: tuple[float, float, float] = Field((4.0, 4.0, 4.0), description="Target voxel spacing (mm).")
    hu_window: tuple[float, float] = Field((-200.0, 300.0), description="HU range mapped to [0, 1] (abdominal soft tissue).")
    orientation: str = Field("RAS", description="Canonical axis codes the network sees.")


class RegistrationConfig(_Strict):
    """Atlas-to-scan registration with elastix (affine then B-spline, multi-resolution)."""

    resolutions: int = Field(3, ge=1, le=5, description="Pyramid levels for both stages.")
    affine_iterations: int = Field(256, ge=1)
    bspline_iterations: int = Field(256, ge=1)
    grid_spacing_mm: float = Field(24.0, gt=0, description="B-spline control point spacing (mm).")
    metric: Literal["AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation", "AdvancedMeanSquares"] = Field(
        "AdvancedMattesMutualInformation", description="Similarity metric (MI is robust to scanner HU differences)."
    )
    spatial_samples: int = Field(4096, ge=256, description="Random samples per iteration.")
    workers: int = Field(2, ge=1, description="Registrations run at once (each with one ITK thread).")
    seed: int = 0


class FusionConfig(_Strict):
    """Multi-atlas label fusion."""

    method: Literal["majority"] = Field("majority", description="Fusion rule.")


class AmplifyConfig(_Strict):
    registration: RegistrationConfig = RegistrationConfig()
    fusion: FusionConfig = FusionConfig()
    max_atlases: int = Field(5, ge=1, description="Use at most this many labeled scans as atlases.")


class TrainConfig(_Strict):
    """Local training (used alone, and by each site inside federation)."""

    channels: tuple[int, ...] = Field((16, 32, 64, 128), description="U-Net feature channels per level.")
    epochs: int = Field(50, ge=1, description="Epochs for local/centralised training.")
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(1, ge=1)
    confidence_threshold: float = Field(
        0.7, ge=0, le=1, description="Amplified-label voxels with lower fusion confidence are ignored by the loss."
    )
    amp: bool = Field(True, description="Mixed precision when CUDA is present (ignored on CPU).")
    seed: int = 0
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = leave torch's default.")


class SiteSpec(_Strict):
    """One hospital's data as federation sees it (only the site itself ever reads these paths)."""

    name: str
    data: Path = Field(description="Site folder in nnU-Net v2 / MSD layout.")
    amplified: Path | None = Field(None, description="Output folder of `fadal amplify` for this site, if used.")
    use_amplified: bool = Field(False, description="Train on amplified pseudo-labels as well as the real labels.")


class FederationConfig(_Strict):
    """`fadal federate --config fl.yaml`."""

    sites: list[SiteSpec]
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    strategy: Literal["fedavg"] = Field("fedavg", description="Aggregation strategy.")
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(0, ge=0, description="Minimum sites per round (0 = all configured sites).")
    evaluate_every: int = Field(1, ge=0, description="Sites score the global model on their held-out cases every N rounds (0 = never; otherwise also after the last round).")
    labels: dict[str, int] | None = Field(None, description="The federation's label set (default: the first site's dataset.json).")
    train: TrainConfig = TrainConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    out: Path = Field(Path("runs/federated"), description="Checkpoints, history and report go here.")


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
    if isinstance(cfg, FederationConfig):
        for site in cfg.sites:
            site.data = _rel(site.data, path.parent)
            if site.amplified is not None:
                site.amplified = _rel(site.amplified, path.parent)
        cfg.out = _rel(cfg.out, path.parent)
    return cfg


def _rel(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()
