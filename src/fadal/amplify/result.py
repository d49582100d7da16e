"""One registered pair's result, and whether it counts as a failed registration.

**Failure detection** (:func:`registration_failure`): after registration, the Dice of the fixed
and warped-atlas body masks and the NCC of the two scans in the fixed body, both inside the
stretch the warped atlas covers (an atlas showing a shorter stretch is not punished for it), and
the fraction of the expected common body still covered (measured by
:func:`fadal.amplify.register.finish_pair`), are compared with thresholds of the configuration.
The thresholds are not part of the cache key: changing them needs no new registration.

**Calibrated on OpenKBP** (``benchmarks/registration_calibration.py``: 54 atlas registrations with
real labels on both sides, plus 18 atlases flipped upside down or face-to-back): neither body-mask
Dice (pairs whose warped labels are as good as the median: 0.39-0.99; flipped atlases 0.39-0.97)
nor one pair's NCC alone (good 0.32-0.87, flipped -0.10-0.55) separates the two. What does is an
atlas's NCC *relative to the best atlas on the same scan* (:func:`registration_failures`,
``min_ncc_ratio``): at 0.8 it passed 98 % of the good pairs and caught every flipped atlas. The
absolute floors (``min_ncc``, ``min_body_dice``, ``min_overlap``) remain for the scan whose every
atlas failed, set below every good pair measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from fadal.config import RegistrationConfig


@dataclass
class RegistrationResult:
    """One registered pair (see the module docstring for the quality measures).

    ``metric_before``: NCC in the fixed body with no registration (world coordinates as stored);
    ``metric_init``: after the initial translation; ``metric_after``: after elastix. ``body_dice``,
    ``overlap``: body-mask Dice and covered fraction of the fixed body after registration.
    ``init_translation_mm``: the initial translation (fixed -> atlas world coordinates).
    """

    fixed: Path
    moving: Path
    warped_label: Path
    metric_before: float
    metric_after: float
    seconds: float
    cached: bool
    atlas_label: Path | None = None
    key: str = ""
    metric_name: str = field(default="ncc_body")
    warped_image: Path | None = None
    metric_init: float = float("nan")
    body_dice: float = float("nan")
    overlap: float = float("nan")
    init_translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None  # elastix gave up (register_many(errors="record")); no files then

    _PATHS = ("fixed", "moving", "warped_label", "atlas_label", "warped_image")

    def to_json(self) -> dict:
        out = asdict(self)
        for k in self._PATHS:
            out[k] = None if out[k] is None else str(out[k])
        out["init_translation_mm"] = [float(v) for v in self.init_translation_mm]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "RegistrationResult":
        """The inverse of :meth:`to_json`. A key this class does not have is an error (``ValueError``
        naming it): results are written by :meth:`to_json` only, so one is a bug, not an old format."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"registration result: unknown key(s) {', '.join(map(repr, unknown))}")
        data = dict(data)
        for k in cls._PATHS:
            if data.get(k) is not None:
                data[k] = Path(data[k])
        if "init_translation_mm" in data:
            data["init_translation_mm"] = tuple(data["init_translation_mm"])
        return cls(**data)


def registration_failure(res: RegistrationResult, cfg: RegistrationConfig) -> str | None:
    """Why ``res`` counts as a failed registration under ``cfg``'s thresholds, or ``None`` if it does not."""
    if res.error is not None:
        return res.error
    problems = []
    if not res.overlap >= cfg.min_overlap:  # also catches NaN
        problems.append(f"warped atlas covers {res.overlap:.2f} of the body < min_overlap {cfg.min_overlap:g}")
    if not res.body_dice >= cfg.min_body_dice:
        problems.append(f"body-mask Dice {res.body_dice:.3f} < min_body_dice {cfg.min_body_dice:g}")
    if not res.metric_after >= cfg.min_ncc:
        problems.append(f"NCC {res.metric_after:.3f} < min_ncc {cfg.min_ncc:g}")
    return "; ".join(problems) or None


def ncc_ratios(results: list[RegistrationResult]) -> list[float]:
    """Each result's NCC divided by the best NCC among ``results`` (the atlases registered onto one scan);
    NaN when no atlas has a positive NCC."""
    values = [r.metric_after for r in results if r.error is None and r.metric_after == r.metric_after]
    best = max(values, default=float("nan"))
    return [r.metric_after / best if best > 0 else float("nan") for r in results]


def registration_failures(results: list[RegistrationResult], cfg: RegistrationConfig) -> list[str | None]:
    """Why each of the atlases registered onto one scan failed (:func:`registration_failure`), or counts as
    failed beside the others: an NCC below ``cfg.min_ncc_ratio`` times the best atlas's on that scan."""
    out = []
    for res, ratio in zip(results, ncc_ratios(results)):
        why = registration_failure(res, cfg)
        if why is None and not ratio >= cfg.min_ncc_ratio:
            why = f"NCC {res.metric_after:.3f} < min_ncc_ratio {cfg.min_ncc_ratio:g} x the best atlas's on this scan"
        out.append(why)
    return out
