"""The metrics document every report reads: how it is built from evaluation results, and read back.

Format: ``{"variants": {variant: {site: {organ: {"dice": float, "hd95": float | None,
"surface_dice": float | None}}}}}``; a site dict may hold an extra ``"mean"`` organ. Optionally
``"per_case": {variant: {site: {case_id: {organ: {...}}}}}``. Written as ``metrics.json`` next to each report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fadal.errors import FadalInputError

MEAN = "mean"


def metrics_document(variants: dict[str, dict[str, dict]]) -> dict:
    """``{variant: {site: evaluate-result}}`` -> the metrics document."""
    return {
        "variants": {v: {s: r["summary"] for s, r in sites.items()} for v, sites in variants.items()},
        "per_case": {v: {s: r["per_case"] for s, r in sites.items()} for v, sites in variants.items()},
    }


def variants_of(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``metrics["variants"]``, or a clear error when the document is not a metrics document."""
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("variants"), Mapping):
        raise FadalInputError('metrics must be a dict with a "variants" entry: {"variants": {variant: {site: ...}}}')
    variants = metrics["variants"]
    if not variants:
        raise FadalInputError('metrics["variants"] is empty: nothing to report')
    return variants


def ordered_union(keys: Iterable[Iterable[str]]) -> list[str]:
    """All keys in first-seen order: variants may cover different sites and organs."""
    seen: dict[str, None] = {}
    for ks in keys:
        for k in ks:
            seen.setdefault(k, None)
    return list(seen)


def variant_sites(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every site any variant was scored on."""
    return ordered_union(v.keys() for v in variants.values())


def site_organs(variants: Mapping[str, Mapping[str, Any]], site: str) -> list[str]:
    """Every organ any variant scored at ``site`` (not the ``mean`` entry)."""
    return [o for o in ordered_union(v.get(site, {}).keys() for v in variants.values()) if o != MEAN]


def finite_number(value: Any) -> float | None:
    """A value as a finite float, else None (missing, NaN, inf, bool, text): shown as a dash."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def site_mean(site_metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    """The site's ``mean`` entry, else the mean over its organs (None if nothing to average)."""
    if not site_metrics:
        return None
    if MEAN in site_metrics:
        return finite_number((site_metrics[MEAN] or {}).get(metric))
    vals = [finite_number((m or {}).get(metric)) for o, m in site_metrics.items() if o != MEAN]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def comparison_values(variants: Mapping[str, Any], metric: str) -> list[tuple[str, str, list[float | None]]]:
    """Rows ``(site, organ, value per variant)``, each site closed by its ``mean`` row."""
    rows = []
    for site in variant_sites(variants):
        for organ in site_organs(variants, site):
            rows.append((site, organ, [finite_number((v.get(site, {}).get(organ) or {}).get(metric))
                                       for v in variants.values()]))
        rows.append((site, MEAN, [site_mean(v.get(site), metric) for v in variants.values()]))
    return rows
