"""A report people can look at: one self-contained HTML file, the same tables in Markdown, and the plots as PNGs.

Input formats (produced elsewhere in FADAL):

* ``metrics``: the metrics document (:mod:`fadal.evaluate.metrics_document`).
* ``history``: ``{variant: [{"round": int, "loss": float, "dice": {site: float} (optional),
  "seconds": float}, ...]}``, one entry per federated round (or epoch).
* ``amplification``: ``{site: {"scans": int, "accepted": int, "rejected": int,
  "mean_confidence": {organ: float}, "seconds": float}}``.
* ``overlays``: ``[(png_path, caption), ...]``.
* ``status``: a :class:`RunStatus` for a federation's live page (rewritten after every round while it runs,
  reloading itself in the browser): progress and each site's status first; ``metrics`` may then hold no
  variant yet.

The HTML embeds every image as a base64 PNG and its CSS inline: it opens anywhere, offline, and can be mailed as
one file. Every file is written atomically (temporary file, then ``os.replace``). Tables live in
:mod:`fadal.evaluate.tables`, plots in :mod:`fadal.evaluate.plots`; this module lays them out in sections.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fadal.data.io import atomic_write_bytes, write_json
from fadal.evaluate.metrics_document import variant_sites, variants_of
from fadal.evaluate.plots import plot_confidence, plot_dice_bars, plot_history
from fadal.evaluate.tables import (METRICS, amplification_table, communication_tables, fmt_duration, fmt_int,
                                   has_metric, metric_table, per_case_tables, site_status_table, summary_table,
                                   training_table)

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
tr.failed td { background:#ffebe9; }
.run-state { font-weight:600; }
"""


# Script errors are counted on <html data-js-errors="N"> so a headless browser test can read them.
_ERROR_PROBE = ("<script>document.documentElement.dataset.jsErrors='0';"
                "window.addEventListener('error',function(){var d=document.documentElement.dataset;"
                "d.jsErrors=String(Number(d.jsErrors)+1);});</script>\n")


@dataclass
class RunStatus:
    """Where a federation stands, for its live page: ``state`` is ``running`` (the page reloads itself every
    ``refresh_seconds``), ``finished`` or ``stopped`` (``detail`` says why)."""

    state: str
    rounds_done: int
    rounds_total: int
    detail: str = ""
    refresh_seconds: int = 30


@dataclass
class _Section:
    """One section of the report, in both renderings (HTML parts, Markdown parts)."""

    sid: str
    heading: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def add(self, html_part: str, md_part: str) -> None:
        self.html.append(html_part)
        self.md.append(md_part)


class _Plots:
    """Writes each plot as ``plots/<name>.png`` and embeds it in a section; remembers the paths."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: dict[str, Path] = {}

    def embed(self, section: _Section, name: str, png: bytes | None, caption: str) -> None:
        if png is None:
            return
        self.paths[f"plot_{name}"] = atomic_write_bytes(self.folder / f"{name}.png", png)
        section.add(_html_figure(png, caption), f"![{_md_text(caption)}](plots/{name}.png)")


def write_report(
    out_dir: Path,
    metrics: dict,
    history: dict | None = None,
    amplification: dict | None = None,
    overlays: list[tuple[Path, str]] | None = None,
    title: str = "FADAL report",
    viewer: str | None = None,
    status: RunStatus | None = None,
) -> dict[str, Path]:
    """Write ``out_dir/report.html``, ``out_dir/report.md`` and the plots as PNGs in ``out_dir/plots/``.

    The HTML is one self-contained file (plots and overlays embedded as base64 PNG, CSS inline, no network
    access needed); the Markdown holds the same tables and links the PNGs in ``plots/``. Overlay files that do
    not exist are listed as missing rather than failing the report. Returns ``{"html": .., "markdown": ..,
    "plots_dir": .., "plot_<name>": ..}``.
    """
    out_dir = Path(out_dir)
    plots = _Plots(out_dir / "plots")
    sections: list[_Section] = []
    if status is not None:
        sections.append(_status_section(status, history or {}))
    variants: Mapping[str, Any] = {}
    if status is None or (metrics or {}).get("variants"):  # a live page may come before any evaluation
        variants = variants_of(metrics)
        summary = summary_table(variants)
        sections += [_Section("summary", "Summary", [summary.html()], [summary.markdown()]),
                     _organ_section(variants, plots)]
    if history:
        sections += _training_sections(history, plots)
    if amplification:
        sections.append(_amplification_section(amplification, plots))
    if overlays:
        sections.append(_overlay_section(overlays, out_dir))
    if viewer:  # an HTML fragment from fadal.navigation.viewer (interactive, HTML only)
        sections.append(_Section("viewer", "3D organ view", [viewer], ["*Interactive 3D view: open report.html.*"]))
    per_case = (metrics or {}).get("per_case") or {}
    if per_case:
        sections.append(_per_case_section(per_case))

    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    refresh = status.refresh_seconds if status is not None and status.state == "running" else None
    paths = dict(plots.paths)
    paths["html"] = atomic_write_bytes(out_dir / "report.html",
                                       _html_page(title, stamp, variants, sections, refresh).encode("utf-8"))
    paths["markdown"] = atomic_write_bytes(out_dir / "report.md",
                                           _markdown_page(title, stamp, variants, sections).encode("utf-8"))
    paths["plots_dir"] = plots.folder
    return paths


def write_run_report(out: Path, metrics: dict, history: dict | None = None, amplification: dict | None = None,
                     title: str = "FADAL report", overlays: list[tuple[Path, str]] | None = None,
                     viewer: str | None = None) -> dict[str, Path]:
    """A run's report with its data beside it: ``metrics.json`` (and ``history.json``), then the report,
    so that `fadal report` can rebuild it later from the folder alone."""
    write_json(metrics, out / "metrics.json")
    if history is not None:
        write_json(history, out / "history.json")
    return write_report(out, metrics, history=history, amplification=amplification, overlays=overlays,
                        viewer=viewer, title=title)


# --------------------------------------------------------------------------------------------- sections


def _status_section(status: RunStatus, history: Mapping[str, Sequence[Mapping[str, Any]]]) -> _Section:
    """Progress (rounds done, last round's time, time left at the mean round time) and each site's status."""
    section = _Section("status", "Run status")
    entries = next(iter(history.values()), [])
    secs = [float(e["seconds"]) for e in entries if e.get("seconds") is not None]
    words = {"running": "Running", "finished": "Finished", "stopped": "Stopped"}.get(status.state, status.state)
    text = f"{words}: {status.rounds_done} of {status.rounds_total} rounds done"
    if secs:
        text += f"; last round {fmt_duration(secs[-1])}"
        left = status.rounds_total - status.rounds_done
        if status.state == "running" and left > 0:
            text += f", about {fmt_duration(left * sum(secs) / len(secs))} to go"
    text += "."
    if status.detail:
        text += f" {status.detail}"
    if status.state == "running":
        text += f" This page reloads itself every {status.refresh_seconds} s."
    section.add(f'<p class="run-state" data-run-state="{html.escape(status.state)}">{html.escape(text)}</p>',
                f"**{_md_text(text)}**")
    t = site_status_table(entries)
    if t is not None:
        section.add(t.html(), t.markdown())
    return section


def _organ_section(variants: Mapping[str, Any], plots: _Plots) -> _Section:
    """Dice (and HD95 / surface Dice where measured) per site and organ, then the Dice bars."""
    section = _Section("organs", "Per-organ results")
    for metric in ("dice", "hd95", "surface_dice"):
        if metric != "dice" and not has_metric(variants, metric):
            continue
        t = metric_table(variants, metric)
        section.html += [f"<h3>{html.escape(METRICS[metric][0])}</h3>", t.html()]
        section.md += [f"### {METRICS[metric][0]}", t.markdown()]
    plots.embed(section, "dice_by_organ", plot_dice_bars(variants), "Dice per organ and site, one bar per variant.")
    return section


def _training_sections(history: Mapping[str, Sequence[Mapping[str, Any]]], plots: _Plots) -> list[_Section]:
    """The training table and curves; the bytes each site sent and received when a federation metered them."""
    training = _Section("training", "Training")
    t = training_table(history)
    training.add(t.html(), t.markdown())
    plots.embed(training, "history", plot_history(history), "Per-round training loss and per-site validation Dice.")
    comm = communication_tables(history)
    if not comm:
        return [training]
    communication = _Section("communication", "Communication")
    for name, t in comm:
        communication.html.append(f"<details><summary>{html.escape(name)}: {fmt_int(len(t.rows) - 1)} rounds"
                                  f"</summary>{t.html()}</details>")
        communication.md += [f"### {name}", t.markdown()]
    return [training, communication]


def _amplification_section(amplification: Mapping[str, Mapping[str, Any]], plots: _Plots) -> _Section:
    """Amplification per site, its confidence plot, and the scans and organs QC turned away."""
    e = html.escape
    section = _Section("amplification", "Data amplification")
    t = amplification_table(amplification)
    section.add(t.html(), t.markdown())
    plots.embed(section, "confidence", plot_confidence(amplification),
                "Mean confidence of accepted pseudo-labels per organ and site.")
    for site, a in amplification.items():
        for key, what in (("rejections", "rejected scans"), ("demoted", "organs QC set to unknown")):
            items = [str(x) for x in (a.get(key) or [])]
            if items:
                section.html.append(f"<details><summary>{e(site)}: {len(items)} {what}</summary><ul>"
                                    + "".join(f"<li>{e(x)}</li>" for x in items) + "</ul></details>")
                section.md += [f"**{_md_text(site)}: {len(items)} {what}**",
                               "\n".join(f"- {_md_text(x)}" for x in items)]
    return section


def _overlay_section(overlays: list[tuple[Path, str]], out_dir: Path) -> _Section:
    """Overlay PNGs embedded (HTML) and linked (Markdown); a missing file is said, not fatal."""
    section = _Section("overlays", "Overlays")
    for png_path, caption in overlays:
        png_path = Path(png_path)
        try:
            data = png_path.read_bytes()
        except OSError:
            section.add(f'<p class="note">overlay missing: {html.escape(str(png_path))} ({html.escape(caption)})</p>',
                        f"*overlay missing: {png_path} ({_md_text(caption)})*")
            continue
        section.add(_html_figure(data, caption), f"![{_md_text(caption)}]({_md_link(png_path, out_dir)})")
    return section


def _per_case_section(per_case: Mapping[str, Any]) -> _Section:
    section = _Section("per-case", "Per-case Dice")
    for name, t in per_case_tables(per_case):
        section.html.append(f"<details><summary>{html.escape(name)} ({len(t.rows)} cases)</summary>{t.html()}</details>")
        section.md += [f"### {name}", t.markdown()]
    return section


# --------------------------------------------------------------------------------------------- pages


def _html_page(title: str, stamp: str, variants: Mapping[str, Any], sections: list[_Section],
               refresh: int | None = None) -> str:
    e = html.escape
    sites = variant_sites(variants)
    nav = "".join(f'<a href="#{s.sid}">{e(s.heading)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.sid}"><h2>{e(s.heading)}</h2>\n' + "\n".join(s.html) + "</section>"
                     for s in sections)
    meta = (f"Generated {e(stamp)} &middot; {len(variants)} variant(s): {e(', '.join(variants))} &middot; "
            f"{len(sites)} site(s): {e(', '.join(sites))}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        + (f'<meta http-equiv="refresh" content="{int(refresh)}">\n' if refresh else "")
        + f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n{_ERROR_PROBE}</head>\n<body>\n<main>\n"
        f'<h1>{e(title)}</h1>\n<p class="meta">{meta}</p>\n<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n'
    )


def _markdown_page(title: str, stamp: str, variants: Mapping[str, Any], sections: list[_Section]) -> str:
    lines = [f"# {title}", "", f"Generated {stamp}. Variants: {', '.join(variants)}. "
             f"Sites: {', '.join(variant_sites(variants))}.", ""]
    for s in sections:
        lines += [f"## {s.heading}", "", *[p for part in s.md for p in (part, "")]]
    return "\n".join(lines).rstrip() + "\n"


def _html_figure(png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _md_text(text: str) -> str:
    """Caption text safe inside Markdown image alt text (no brackets, no raw HTML)."""
    return html.escape(text, quote=False).replace("[", "(").replace("]", ")")


def _md_link(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # different drive on Windows
        return str(path)
