"""The report's tables, kept as text cells plus flags so that each renders to both HTML and Markdown.

Also the comparison table the CLI prints (site x organ rows, one column per variant).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fadal.evaluate.metrics_document import (MEAN, comparison_values, finite_number, ordered_union, site_mean,
                                             variant_sites, variants_of)

DASH = "\u2013"  # shown for a missing value / None

#: metric -> (heading, decimals, unit, higher is better)
METRICS: dict[str, tuple[str, int, str, bool]] = {
    "dice": ("Dice", 3, "", True),
    "hd95": ("HD95 (mm)", 1, " mm", False),
    "surface_dice": ("Surface Dice", 3, "", True),
}


def format_value(value: Any, metric: str = "dice") -> str:
    """A metric value as table text: 3 decimals (Dice, surface Dice), 1 decimal (HD95, mm); ``"–"`` for None."""
    v = finite_number(value)
    if v is None:
        return DASH
    decimals = METRICS.get(metric, ("", 3, "", True))[1]
    return f"{v:.{decimals}f}"


def comparison_table(metrics: Mapping[str, Any], metric: str = "dice") -> list[list[str]]:
    """Rows site x organ (then one ``mean`` row per site), columns variants, as formatted text.

    The first row is the header ``["site", "organ", *variants]``; each further row is
    ``[site, organ, value per variant]``. The ``mean`` row uses the site's ``"mean"`` entry when present, else
    the mean over that site's organs. Missing values are ``"–"``. Used by the CLI (rich table) and the report.
    """
    variants = variants_of(metrics)
    header = ["site", "organ", *variants]
    return [header] + [[site, organ, *(format_value(v, metric) for v in vals)]
                       for site, organ, vals in comparison_values(variants, metric)]


def best_indices(values: Sequence[float | None], higher_is_better: bool, decimals: int = 3) -> set[int]:
    """Indices of the best value(s) as displayed (rounded, so shown ties are all marked); empty when fewer than
    two values can be compared."""
    present = [(i, round(v, decimals)) for i, v in enumerate(values) if v is not None]
    if len(present) < 2:
        return set()
    target = max(v for _, v in present) if higher_is_better else min(v for _, v in present)
    return {i for i, v in present if v == target}


class Table:
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


def summary_table(variants: Mapping[str, Any]) -> Table:
    """Mean Dice per site and variant (and over sites): the first thing a reader looks at."""
    names = list(variants)
    t = Table(["site", *names], caption="Mean Dice over organs per site; best variant in bold.")
    per_variant: list[list[float]] = [[] for _ in names]
    for site in variant_sites(variants):
        vals = [site_mean(v.get(site), "dice") for v in variants.values()]
        for i, x in enumerate(vals):
            if x is not None:
                per_variant[i].append(x)
        t.add([site, *(format_value(x) for x in vals)], best_indices(vals, True))
    if len(variant_sites(variants)) > 1:
        overall = [float(np.mean(xs)) if xs else None for xs in per_variant]
        t.add(["all sites (mean)", *(format_value(x) for x in overall)], best_indices(overall, True), "total")
    return t


def metric_table(variants: Mapping[str, Any], metric: str) -> Table:
    """One metric per site and organ, the best variant of each row marked."""
    heading, decimals, _, higher = METRICS[metric]
    better = "highest" if higher else "lowest"
    t = Table(["site", "organ", *variants], numeric_from=2,
               caption=f"{heading} per site and organ; {better} per row in bold.")
    for site, organ, vals in comparison_values(variants, metric):
        t.add([site, organ, *(format_value(v, metric) for v in vals)], best_indices(vals, higher, decimals),
              "total" if organ == MEAN else "")
    return t


def has_metric(variants: Mapping[str, Any], metric: str) -> bool:
    """Whether any variant has a value for ``metric`` (HD95 and surface Dice tables are optional)."""
    return any(finite_number((m or {}).get(metric)) is not None
               for v in variants.values() for s in v.values() for m in s.values())


def training_table(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> Table:
    """Rounds, final and best loss, time (and the last DP epsilon when one was spent) per variant."""
    dp = any(finite_number(e.get("epsilon")) is not None for entries in history.values() for e in entries)
    t = Table(["variant", "rounds", "final loss", "best loss", "total time", *(["DP epsilon"] if dp else [])])
    for variant, entries in history.items():
        losses = [x for x in (finite_number(e.get("loss")) for e in entries) if x is not None]
        secs = [x for x in (finite_number(e.get("seconds")) for e in entries) if x is not None]
        eps = [x for x in (finite_number(e.get("epsilon")) for e in entries) if x is not None]
        t.add([variant, str(len(entries)),
               f"{losses[-1]:.4f}" if losses else DASH,
               f"{min(losses):.4f}" if losses else DASH,
               fmt_duration(sum(secs)) if secs else DASH,
               *([f"{eps[-1]:.2f}" if eps else DASH] if dp else [])])
    return t


def communication_tables(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[tuple[str, Table]]:
    """Per federated variant: MB sent to (down) and received from (up) each site in each round.

    Sites are Flower node ids: that is all the server knows of them."""
    out = []
    for variant, entries in history.items():
        rows = [e for e in entries if e.get("bytes_down_per_site") or e.get("bytes_up_per_site")]
        if not rows:
            continue
        nodes = ordered_union(list((e.get("bytes_down_per_site") or {}).keys()) + list((e.get("bytes_up_per_site") or {}).keys())
                       for e in rows)
        t = Table(["round", *[f"{n[-6:]} {d}" for n in nodes for d in ("down", "up")], "total"],
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


#: A site's part in one round, as the server saw it (:attr:`fadal.records.RoundEntry.site_status`).
ANSWERED, FAILED, NO_REPLY = "answered", "failed", "no reply"


def site_status_table(entries: Sequence[Mapping[str, Any]]) -> Table | None:
    """Per site (Flower node id, last digits): its status in the last round that asked it, the rounds it
    answered of those that asked it, its training seconds in its last answered round and the median over
    rounds. Aggregate only, as the server holds it: nothing per case. None before any round was recorded."""
    def statuses(e: Mapping[str, Any]) -> dict[str, str]:
        known = dict(e.get("site_status") or {})
        for node in e.get("train_seconds_per_site") or {}:  # histories from before site_status was recorded
            known.setdefault(node, ANSWERED)
        return known

    nodes = ordered_union(list(statuses(e)) for e in entries)
    if not nodes:
        return None
    t = Table(["site", "status", "last round", "answered", "train s (last)", "train s (median)"], numeric_from=2,
              caption="Per site (Flower node id, last digits): status in the last round that asked it, rounds "
                      "answered of those that asked it, local training seconds.")
    for node in nodes:
        seen = [(e.get("round"), statuses(e)[node]) for e in entries if node in statuses(e)]
        secs = [float(e["train_seconds_per_site"][node]) for e in entries
                if node in (e.get("train_seconds_per_site") or {})]
        last_round, last = seen[-1]
        answered = sum(st == ANSWERED for _, st in seen)
        t.add([node[-6:], last, str(last_round), f"{answered} of {len(seen)}",
               f"{secs[-1]:.1f}" if secs else DASH, f"{float(np.median(secs)):.1f}" if secs else DASH],
              row_class="" if last == ANSWERED else "failed")
    return t


def amplification_table(amplification: Mapping[str, Mapping[str, Any]]) -> Table:
    """Per site: scans amplified, accepted/rejected by QC, mean confidence, time."""
    t = Table(["site", "scans", "accepted", "rejected", "accepted %", "mean confidence", "time"])
    for site, a in amplification.items():
        scans, acc, rej = (finite_number(a.get(k)) for k in ("scans", "accepted", "rejected"))
        conf = [x for x in (finite_number(c) for c in (a.get("mean_confidence") or {}).values()) if x is not None]
        secs = finite_number(a.get("seconds"))
        t.add([site,
               fmt_int(scans), fmt_int(acc), fmt_int(rej),
               f"{100 * acc / scans:.0f} %" if acc is not None and scans else DASH,
               f"{np.mean(conf):.3f}" if conf else DASH,
               fmt_duration(secs) if secs is not None else DASH])
    return t


def per_case_tables(per_case: Mapping[str, Any]) -> list[tuple[str, Table]]:
    """Dice per case and organ, one table per variant and site."""
    out = []
    for variant, sites in per_case.items():
        for site, cases in (sites or {}).items():
            organs = [o for o in ordered_union((c or {}).keys() for c in cases.values()) if o != MEAN]
            t = Table(["case", *organs])
            for case_id, case in cases.items():
                t.add([case_id, *(format_value(((case or {}).get(o) or {}).get("dice")) for o in organs)])
            out.append((f"{variant} / {site}", t))
    return out


def fmt_int(v: float | None) -> str:
    """A count as table text (a dash when missing)."""
    return DASH if v is None else f"{int(round(v))}"


def fmt_duration(seconds: float) -> str:
    """Seconds as s / min s / h min, whichever reads best."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min"
