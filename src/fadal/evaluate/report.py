"""A report people can look at: one self-contained HTML file, the same tables in Markdown, and the plots as PNGs.

Input formats (produced elsewhere in FADAL):

* ``metrics``: ``{"variants": {variant: {site: {organ: {"dice": float, "hd95": float | None,
  "surface_dice": float | None}}}}}``; a site dict may hold an extra ``"mean"`` organ. Optionally
  ``"per_case": {variant: {site: {case_id: {organ: {...}}}}}``.
* ``history``: ``{variant: [{"round": int, "loss": float, "dice": {site: float} (optional),
  "seconds": float}, ...]}``, one entry per federated round (or epoch).
* ``amplification``: ``{site: {"scans": int, "accepted": int, "rejected": int,
  "mean_confidence": {organ: float}, "seconds": float}}``.
* ``overlays``: ``[(png_path, caption), ...]``.

The HTML embeds every image as a base64 PNG and its CSS inline: it opens anywhere, offline, and can be mailed as
one file. Every file is written atomically (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fadal.data.io import atomic_write_bytes
from fadal.errors import FadalInputError

__all__ = ["write_report", "comparison_table", "format_value"]

DASH = "\u2013"  # shown for a missing value / None
MEAN = "mean"

#: metric -> (heading, decimals, unit, higher is better)
_METRICS: dict[str, tuple[str, int, str, bool]] = {
    "dice": ("Dice", 3, "", True),
    "hd95": ("HD95 (mm)", 1, " mm", False),
    "surface_dice": ("Surface Dice", 3, "", True),
}


# --------------------------------------------------------------------------------------------- tables


def format_value(value: Any, metric: str = "dice") -> str:
    """A metric value as table text: 3 decimals (Dice, surface Dice), 1 decimal (HD95, mm); ``"–"`` for None."""
    v = _num(value)
    if v is None:
        return DASH
    decimals = _METRICS.get(metric, ("", 3, "", True))[1]
    return f"{v:.{decimals}f}"


def comparison_table(metrics: Mapping[str, Any], metric: str = "dice") -> list[list[str]]:
    """Rows site x organ (then one ``mean`` row per site), columns variants, as formatted text.

    The first row is the header ``["site", "organ", *variants]``; each further row is
    ``[site, organ, value per variant]``. The ``mean`` row uses the site's ``"mean"`` entry when present, else
    the mean over that site's organs. Missing values are ``"–"``. Used by the CLI (rich table) and the report.
    """
    variants = _variants(metrics)
    header = ["site", "organ", *variants]
    return [header] + [[site, organ, *(format_value(v, metric) for v in vals)]
                       for site, organ, vals in _comparison_values(variants, metric)]


def _variants(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("variants"), Mapping):
        raise FadalInputError('metrics must be a dict with a "variants" entry: {"variants": {variant: {site: ...}}}')
    variants = metrics["variants"]
    if not variants:
        raise FadalInputError('metrics["variants"] is empty: nothing to report')
    return variants


def _union(keys: Iterable[Iterable[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for ks in keys:
        for k in ks:
            seen.setdefault(k, None)
    return list(seen)


def _sites(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return _union(v.keys() for v in variants.values())


def _organs(variants: Mapping[str, Mapping[str, Any]], site: str) -> list[str]:
    return [o for o in _union(v.get(site, {}).keys() for v in variants.values()) if o != MEAN]


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _site_mean(site_metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    """The site's ``mean`` entry, else the mean over its organs (None if nothing to average)."""
    if not site_metrics:
        return None
    if MEAN in site_metrics:
        return _num((site_metrics[MEAN] or {}).get(metric))
    vals = [_num((m or {}).get(metric)) for o, m in site_metrics.items() if o != MEAN]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _comparison_values(variants: Mapping[str, Any], metric: str) -> list[tuple[str, str, list[float | None]]]:
    rows = []
    for site in _sites(variants):
        for organ in _organs(variants, site):
            rows.append((site, organ, [_num((v.get(site, {}).get(organ) or {}).get(metric))
                                       for v in variants.values()]))
        rows.append((site, MEAN, [_site_mean(v.get(site), metric) for v in variants.values()]))
    return rows


def _best(values: Sequence[float | None], higher_is_better: bool, decimals: int = 3) -> set[int]:
    """Indices of the best value(s) as displayed (rounded, so shown ties are all marked); empty when fewer than
    two values can be compared."""
    present = [(i, round(v, decimals)) for i, v in enumerate(values) if v is not None]
    if len(present) < 2:
        return set()
    target = max(v for _, v in present) if higher_is_better else min(v for _, v in present)
    return {i for i, v in present if v == target}


class _Table:
    """A table kept as text cells plus flags (highlight, numeric) so it renders to both HTML and Markdown."""

    def __init__(self, header: Sequence[str], numeric_from: int = 1, caption: str = ""):
        self.header = list(header)
        self.rows: list[list[str]] = []
        self.best: list[set[int]] = []
        self.row_class: list[str] = []
        self.numeric_from = numeric_from
        self.caption = caption

    def add(self, cells: Sequence[str], best: set[int] | None = None, row_class: str = "") -> None:
        """``best`` indexes the numeric columns (0 = first column from ``numeric_from``)."""
        self.rows.append(list(cells))
        self.best.append({i + self.numeric_from for i in (best or set())})
        self.row_class.append(row_class)

    def html(self) -> str:
        e = html.escape
        out = ['<div class="table-wrap">\n<table>']
        if self.caption:
            out.append(f"<caption>{e(self.caption)}</caption>")
        num = ' class="num"'
        out.append("<thead><tr>" + "".join(
            f"<th{num if i >= self.numeric_from else ''}>{e(h)}</th>" for i, h in enumerate(self.header)
        ) + "</tr></thead><tbody>")
        for cells, best, cls in zip(self.rows, self.best, self.row_class):
            tds = []
            for i, c in enumerate(cells):
                classes = (["num"] if i >= self.numeric_from else []) + (["best"] if i in best else [])
                attr = f' class="{" ".join(classes)}"' if classes else ""
                tds.append(f"<td{attr}>{e(c)}</td>")
            tr = f'<tr class="{cls}">' if cls else "<tr>"
            out.append(tr + "".join(tds) + "</tr>")
        out.append("</tbody></table>\n</div>")
        return "\n".join(out)

    def markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        lines = []
        if self.caption:
            lines += [f"*{esc(self.caption)}*", ""]
        lines.append("| " + " | ".join(esc(h) for h in self.header) + " |")
        lines.append("|" + "|".join("---:" if i >= self.numeric_from else "---" for i in range(len(self.header))) + "|")
        for cells, best in zip(self.rows, self.best):
            shown = (f"**{esc(c)}**" if i in best else esc(c) for i, c in enumerate(cells))
            lines.append("| " + " | ".join(shown) + " |")
        return "\n".join(lines)


def _summary_table(variants: Mapping[str, Any]) -> _Table:
    names = list(variants)
    t = _Table(["site", *names], caption="Mean Dice over organs per site; best variant in bold.")
    per_variant: list[list[float]] = [[] for _ in names]
    for site in _sites(variants):
        vals = [_site_mean(v.get(site), "dice") for v in variants.values()]
        for i, x in enumerate(vals):
            if x is not None:
                per_variant[i].append(x)
        t.add([site, *(format_value(x) for x in vals)], _best(vals, True))
    if len(_sites(variants)) > 1:
        overall = [float(np.mean(xs)) if xs else None for xs in per_variant]
        t.add(["all sites (mean)", *(format_value(x) for x in overall)], _best(overall, True), "total")
    return t


def _metric_table(variants: Mapping[str, Any], metric: str) -> _Table:
    heading, decimals, _, higher = _METRICS[metric]
    better = "highest" if higher else "lowest"
    t = _Table(["site", "organ", *variants], numeric_from=2,
               caption=f"{heading} per site and organ; {better} per row in bold.")
    for site, organ, vals in _comparison_values(variants, metric):
        t.add([site, organ, *(format_value(v, metric) for v in vals)], _best(vals, higher, decimals),
              "total" if organ == MEAN else "")
    return t


def _has_metric(variants: Mapping[str, Any], metric: str) -> bool:
    return any(_num((m or {}).get(metric)) is not None
               for v in variants.values() for s in v.values() for m in s.values())


def _training_table(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> _Table:
    dp = any(_num(e.get("epsilon")) is not None for entries in history.values() for e in entries)
    t = _Table(["variant", "rounds", "final loss", "best loss", "total time", *(["DP epsilon"] if dp else [])])
    for variant, entries in history.items():
        losses = [x for x in (_num(e.get("loss")) for e in entries) if x is not None]
        secs = [x for x in (_num(e.get("seconds")) for e in entries) if x is not None]
        eps = [x for x in (_num(e.get("epsilon")) for e in entries) if x is not None]
        t.add([variant, str(len(entries)),
               f"{losses[-1]:.4f}" if losses else DASH,
               f"{min(losses):.4f}" if losses else DASH,
               _fmt_duration(sum(secs)) if secs else DASH,
               *([f"{eps[-1]:.2f}" if eps else DASH] if dp else [])])
    return t


def _communication_tables(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, _Table]]:
    """Per federated variant: MB sent to (down) and received from (up) each site in each round.

    Sites are Flower node ids: that is all the server knows of them."""
    out = []
    for variant, entries in history.items():
        rows = [e for e in entries if e.get("bytes_down_per_site") or e.get("bytes_up_per_site")]
        if not rows:
            continue
        nodes = _union(list((e.get("bytes_down_per_site") or {}).keys()) + list((e.get("bytes_up_per_site") or {}).keys())
                       for e in rows)
        t = _Table(["round", *[f"{n[-6:]} {d}" for n in nodes for d in ("down", "up")], "total"],
                   caption="MB per site (Flower node id, last digits) and round: down = global model sent, "
                           "up = update received.", numeric_from=1)
        totals = [0.0] * (2 * len(nodes))
        for e in rows:
            vals = []
            for n in nodes:
                vals += [(e.get("bytes_down_per_site") or {}).get(n), (e.get("bytes_up_per_site") or {}).get(n)]
            totals = [a + (b or 0) for a, b in zip(totals, vals)]
            t.add([str(e.get("round", DASH)), *(DASH if v is None else f"{v / 1e6:.2f}" for v in vals),
                   f"{sum(v or 0 for v in vals) / 1e6:.2f}"])
        t.add(["all rounds", *(f"{v / 1e6:.1f}" for v in totals), f"{sum(totals) / 1e6:.1f}"], row_class="total")
        out.append((variant, t))
    return out


def _amplification_table(amplification: Mapping[str, Mapping[str, Any]]) -> _Table:
    t = _Table(["site", "scans", "accepted", "rejected", "accepted %", "mean confidence", "time"])
    for site, a in amplification.items():
        scans, acc, rej = (_num(a.get(k)) for k in ("scans", "accepted", "rejected"))
        conf = [x for x in (_num(c) for c in (a.get("mean_confidence") or {}).values()) if x is not None]
        secs = _num(a.get("seconds"))
        t.add([site,
               _fmt_int(scans), _fmt_int(acc), _fmt_int(rej),
               f"{100 * acc / scans:.0f} %" if acc is not None and scans else DASH,
               f"{np.mean(conf):.3f}" if conf else DASH,
               _fmt_duration(secs) if secs is not None else DASH])
    return t


def _per_case_tables(per_case: Mapping[str, Any]) -> list[tuple[str, _Table]]:
    out = []
    for variant, sites in per_case.items():
        for site, cases in (sites or {}).items():
            organs = [o for o in _union((c or {}).keys() for c in cases.values()) if o != MEAN]
            t = _Table(["case", *organs])
            for case_id, case in cases.items():
                t.add([case_id, *(format_value(((case or {}).get(o) or {}).get("dice")) for o in organs)])
            out.append((f"{variant} / {site}", t))
    return out


def _fmt_int(v: float | None) -> str:
    return DASH if v is None else f"{int(round(v))}"


def _fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min"


# --------------------------------------------------------------------------------------------- plots


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


def _plot_dice_bars(variants: Mapping[str, Any]) -> bytes:
    sites = _sites(variants)
    n_organs = max((len(_organs(variants, s)) for s in sites), default=1)
    width = min(max(6.0, 1.0 + n_organs * (0.35 + 0.18 * len(variants))), 15.0)
    fig = _new_figure(width, 2.9 * len(sites) + 0.6)
    axes = fig.subplots(len(sites), 1, squeeze=False)[:, 0]
    for ax, site in zip(axes, sites):
        organs = _organs(variants, site)
        series = {name: [_num((v.get(site, {}).get(o) or {}).get("dice")) for o in organs]
                  for name, v in variants.items()}
        _grouped_bars(ax, organs, series, "Dice")
        ax.set_title(f"site: {site}", loc="left", fontsize=11)
    axes[0].legend(title="variant", fontsize=9, ncols=min(len(variants), 4), loc="lower left",
                   bbox_to_anchor=(0, 1.12), frameon=False)
    fig.suptitle("Dice per organ", fontsize=12)
    return _png(fig)


def _x_of(entries: Sequence[Mapping[str, Any]]) -> list[float]:
    return [float(e.get("round", e.get("epoch", i + 1))) for i, e in enumerate(entries)]


def _plot_history(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes | None:
    dice_sites = _union((e.get("dice") or {}).keys() for entries in history.values() for e in entries)
    has_loss = any(_num(e.get("loss")) is not None for entries in history.values() for e in entries)
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
                ys = [_num(e.get("loss")) for e in entries]
            else:
                site = panel.split(":", 1)[1]
                ys = [_num((e.get("dice") or {}).get(site)) for e in entries]
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


def _plot_confidence(amplification: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    organs = _union((a.get("mean_confidence") or {}).keys() for a in amplification.values())
    if not organs:
        return None
    series = {site: [_num((a.get("mean_confidence") or {}).get(o)) for o in organs]
              for site, a in amplification.items()}
    width = min(max(6.0, 1.0 + len(organs) * (0.35 + 0.18 * len(series))), 15.0)
    fig = _new_figure(width, 4.0)
    ax = fig.subplots()
    _grouped_bars(ax, organs, series, "mean confidence")
    ax.legend(title="site", fontsize=9, ncols=min(len(series), 4), loc="lower left", bbox_to_anchor=(0, 1.0),
              frameon=False)
    fig.suptitle("Amplification: mean pseudo-label confidence per organ", fontsize=12)
    return _png(fig)


# --------------------------------------------------------------------------------------------- output

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --zebra:#f6f8fa; --best:#dafbe1; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff; line-height:1.45;
  font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1100px; margin:0 auto; padding:24px 20px 60px; }
h1 { font-size:1.7em; margin:0 0 4px; }
h2 { font-size:1.3em; margin:36px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:1.05em; margin:22px 0 8px; }
.meta { color:var(--muted); margin:0 0 8px; }
nav { margin:10px 0 0; font-size:0.92em; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; }
.table-wrap { overflow-x:auto; margin:8px 0 14px; }
table { border-collapse:collapse; font-size:0.92em; }
caption { text-align:left; color:var(--muted); padding:0 0 6px; caption-side:top; white-space:nowrap; }
th, td { padding:4px 12px; border-bottom:1px solid var(--line); text-align:left; white-space:nowrap; }
th { background:var(--zebra); font-weight:600; border-bottom:2px solid var(--line); }
tbody tr:nth-child(even) { background:#fbfcfd; }
.num { text-align:right; font-variant-numeric:tabular-nums; }
td.best { background:var(--best); font-weight:700; }
tr.total td { font-weight:600; border-bottom:2px solid var(--line); }
figure { margin:10px 0 22px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
figcaption { color:var(--muted); font-size:0.9em; margin-top:4px; }
details { margin:6px 0; }
summary { cursor:pointer; color:var(--accent); }
.note { color:var(--muted); font-style:italic; }
"""


# Script errors are counted on <html data-js-errors="N"> so a headless browser test can read them.
_ERROR_PROBE = ("<script>document.documentElement.dataset.jsErrors='0';"
                "window.addEventListener('error',function(){var d=document.documentElement.dataset;"
                "d.jsErrors=String(Number(d.jsErrors)+1);});</script>\n")


def write_report(
    out_dir: Path,
    metrics: dict,
    history: dict | None = None,
    amplification: dict | None = None,
    overlays: list[tuple[Path, str]] | None = None,
    title: str = "FADAL report",
    viewer: str | None = None,
) -> dict[str, Path]:
    """Write ``out_dir/report.html``, ``out_dir/report.md`` and the plots as PNGs in ``out_dir/plots/``.

    The HTML is one self-contained file (plots and overlays embedded as base64 PNG, CSS inline, no network
    access needed); the Markdown holds the same tables and links the PNGs in ``plots/``. Overlay files that do
    not exist are listed as missing rather than failing the report. Returns ``{"html": .., "markdown": ..,
    "plots_dir": .., "plot_<name>": ..}``.
    """
    out_dir = Path(out_dir)
    variants = _variants(metrics)
    plots_dir = out_dir / "plots"
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    paths: dict[str, Path] = {}
    e = html.escape

    # Sections as (id, heading, html parts, markdown parts).
    sections: list[tuple[str, str, list[str], list[str]]] = []

    def figure(name: str, png: bytes | None, caption: str, h: list[str], md: list[str]) -> None:
        if png is None:
            return
        path = atomic_write_bytes(plots_dir / f"{name}.png", png)
        paths[f"plot_{name}"] = path
        b64 = base64.b64encode(png).decode("ascii")
        h.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{e(caption)}</figcaption></figure>")
        md.append(f"![{_md_text(caption)}](plots/{name}.png)")

    # Summary.
    summary = _summary_table(variants)
    sections.append(("summary", "Summary", [summary.html()], [summary.markdown()]))

    # Per-organ tables.
    h, md = [], []
    for metric in ("dice", "hd95", "surface_dice"):
        if metric != "dice" and not _has_metric(variants, metric):
            continue
        t = _metric_table(variants, metric)
        h += [f"<h3>{e(_METRICS[metric][0])}</h3>", t.html()]
        md += [f"### {_METRICS[metric][0]}", t.markdown()]
    figure("dice_by_organ", _plot_dice_bars(variants), "Dice per organ and site, one bar per variant.", h, md)
    sections.append(("organs", "Per-organ results", h, md))

    if history:
        h, md = [], []
        t = _training_table(history)
        h.append(t.html())
        md.append(t.markdown())
        figure("history", _plot_history(history), "Per-round training loss and per-site validation Dice.", h, md)
        sections.append(("training", "Training", h, md))
        comm = _communication_tables(history)
        if comm:
            h, md = [], []
            for name, t in comm:
                h.append(f"<details><summary>{e(name)}: {_fmt_int(len(t.rows) - 1)} rounds</summary>{t.html()}</details>")
                md += [f"### {name}", t.markdown()]
            sections.append(("communication", "Communication", h, md))

    if amplification:
        h, md = [], []
        t = _amplification_table(amplification)
        h.append(t.html())
        md.append(t.markdown())
        figure("confidence", _plot_confidence(amplification),
               "Mean confidence of accepted pseudo-labels per organ and site.", h, md)
        for site, a in amplification.items():
            for key, what in (("rejections", "rejected scans"), ("demoted", "organs QC set to unknown")):
                items = [str(x) for x in (a.get(key) or [])]
                if items:
                    h.append(f"<details><summary>{e(site)}: {len(items)} {what}</summary><ul>"
                             + "".join(f"<li>{e(x)}</li>" for x in items) + "</ul></details>")
                    md += [f"**{_md_text(site)}: {len(items)} {what}**", "\n".join(f"- {_md_text(x)}" for x in items)]
        sections.append(("amplification", "Data amplification", h, md))

    if overlays:
        h, md = [], []
        for png_path, caption in overlays:
            png_path = Path(png_path)
            try:
                data = png_path.read_bytes()
            except OSError:
                h.append(f'<p class="note">overlay missing: {e(str(png_path))} ({e(caption)})</p>')
                md.append(f"*overlay missing: {png_path} ({_md_text(caption)})*")
                continue
            b64 = base64.b64encode(data).decode("ascii")
            h.append(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
            md.append(f"![{_md_text(caption)}]({_md_link(png_path, out_dir)})")
        sections.append(("overlays", "Overlays", h, md))

    if viewer:  # an HTML fragment from fadal.navigation.viewer (interactive, HTML only)
        sections.append(("viewer", "3D organ view", [viewer], ["*Interactive 3D view: open report.html.*"]))

    per_case = metrics.get("per_case") or {}
    if per_case:
        h, md = [], []
        for name, t in _per_case_tables(per_case):
            h.append(f"<details><summary>{e(name)} ({len(t.rows)} cases)</summary>{t.html()}</details>")
            md += [f"### {name}", t.markdown()]
        sections.append(("per-case", "Per-case Dice", h, md))

    # HTML.
    nav = "".join(f'<a href="#{sid}">{e(head)}</a>' for sid, head, _, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{e(head)}</h2>\n' + "\n".join(parts) + "</section>"
                     for sid, head, parts, _ in sections)
    meta = (f"Generated {e(stamp)} &middot; {len(variants)} variant(s): {e(', '.join(variants))} &middot; "
            f"{len(_sites(variants))} site(s): {e(', '.join(_sites(variants)))}")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n{_ERROR_PROBE}</head>\n<body>\n<main>\n"
        f'<h1>{e(title)}</h1>\n<p class="meta">{meta}</p>\n<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n'
    )
    paths["html"] = atomic_write_bytes(out_dir / "report.html", page.encode("utf-8"))

    # Markdown.
    lines = [f"# {title}", "", f"Generated {stamp}. Variants: {', '.join(variants)}. "
             f"Sites: {', '.join(_sites(variants))}.", ""]
    for _, head, _, parts in sections:
        lines += [f"## {head}", "", *[p for part in parts for p in (part, "")]]
    paths["markdown"] = atomic_write_bytes(out_dir / "report.md", ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    paths["plots_dir"] = plots_dir
    return paths


def _md_text(text: str) -> str:
    """Caption text safe inside Markdown image alt text (no brackets, no raw HTML)."""
    return html.escape(text, quote=False).replace("[", "(").replace("]", ")")


def _md_link(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # different drive on Windows
        return str(path)
