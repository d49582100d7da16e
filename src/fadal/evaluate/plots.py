"""The report's plots as PNG bytes (matplotlib's Agg canvas, without pyplot's global state)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fadal.evaluate.metrics_document import finite_number, ordered_union, site_organs, variant_sites


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global state or backend choice.
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _grouped_bars(ax: Any, groups: list[str], series: Mapping[str, list[float | None]], ylabel: str,
                  ylim: tuple[float, float] | None = (0.0, 1.0)) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        ys = [np.nan if v is None else v for v in vals]
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_dice_bars(variants: Mapping[str, Any]) -> bytes:
    sites = variant_sites(variants)
    n_organs = max((len(site_organs(variants, s)) for s in sites), default=1)
    width = min(max(6.0, 1.0 + n_organs * (0.35 + 0.18 * len(variants))), 15.0)
    fig = _new_figure(width, 2.9 * len(sites) + 0.6)
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]
    for ax, site in zip(axes, sites):
        organs = site_organs(variants, site)
        series = {name: [finite_number((v.get(site, {}).get(o) or {}).get("dice")) for o in organs]
                  for name, v in variants.items()}
        _grouped_bars(ax, organs, series, "Dice")
        ax.set_title(f"site: {site}", loc="left", fontsize=11)
    axes[0].legend(title="variant", fontsize=9, ncols=min(len(variants), 4), loc="lower left",
                   bbox_to_anchor=(0, 1.12), frameon=False)
    fig.suptitle("Dice per organ", fontsize=12)
    return _png(fig)


def _x_of(entries: Sequence[Mapping[str, Any]]) -> list[float]:
    return [float(e.get("round", e.get("epoch", i + 1))) for i, e in enumerate(entries)]


def plot_history(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    dice_sites = ordered_union((e.get("dice") or {}).keys() for entries in history.values() for e in entries)
    has_loss = any(finite_number(e.get("loss")) is not None for entries in history.values() for e in entries)
    panels = (["loss"] if has_loss else []) + [f"dice:{s}" for s in dice_sites]
    if not panels:
        return None
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.3 * ncols + 0.5, 3.2 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for variant, entries in history.items():
            xs = _x_of(entries)
            if panel == "loss":
                ys = [finite_number(e.get("loss")) for e in entries]
            else:
                site = panel.split(":", 1)[1]
                ys = [finite_number((e.get("dice") or {}).get(site)) for e in entries]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=variant)
        if panel == "loss":
            ax.set_title("training loss", loc="left", fontsize=11)
            ax.set_ylabel("loss")
        else:
            ax.set_title(f"validation Dice, site: {panel.split(':', 1)[1]}", loc="left", fontsize=11)
            ax.set_ylabel("mean Dice")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _png(fig)


def plot_confidence(amplification: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    organs = ordered_union((a.get("mean_confidence") or {}).keys() for a in amplification.values())
    if not organs:
        return None
    series = {site: [finite_number((a.get("mean_confidence") or {}).get(o)) for o in organs]
              for site, a in amplification.items()}
    width = min(max(6.0, 1.0 + len(organs) * (0.35 + 0.18 * len(series))), 15.0)
    fig = _new_figure(width, 4.0)
    ax = fig.subplots()
    _grouped_bars(ax, organs, series, "mean confidence")
    ax.legend(title="site", fontsize=9, ncols=min(len(series), 4), loc="lower left", bbox_to_anchor=(0, 1.0),
              frameon=False)
    fig.suptitle("Amplification: mean pseudo-label confidence per organ", fontsize=12)
    return _png(fig)
