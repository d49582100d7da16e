"""`fadal serve --dicomweb`: the watch loop of the navigation workflow.

Each poll asks the PACS (QIDO-RS) for studies matching the filter, and segments each study's CT once
(:func:`fadal.navigation.pacs.predict_from_pacs`). A study is done when the PACS holds a SEG referencing its
CT series, or when ``out/serve_state.json`` (written atomically after each study) says so: a restart redoes
nothing. One log line per study processed, one error line per failure; a failure never stops the loop (the
study is tried again at the next poll)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from fadal.data.dicomweb import PacsAccess, connect, find_studies, pick_ct_series, segmentations_of
from fadal.data.io import write_json
from fadal.errors import FadalInputError
from fadal.navigation.model_package import LoadedModel
from fadal.navigation.predict import ExportOptions

STATE = "serve_state.json"


def parse_filters(items: list[str]) -> dict[str, str]:
    """``["StudyDescription=*planning*"]`` -> ``{"StudyDescription": "*planning*"}``."""
    filters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FadalInputError(f"--match {item!r}: expected KEYWORD=VALUE, e.g. StudyDescription=*planning*")
        filters[key.strip()] = value.strip()
    return filters


def read_state(out: Path) -> dict:
    path = out / STATE
    if not path.exists():
        return {"schema_version": 1, "done": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise FadalInputError(f"{path}: not JSON; remove it (the PACS's SEGs still mark finished studies)") from None
    return state


def poll_once(model: LoadedModel, access: PacsAccess, out: Path, filters: dict[str, str], options: ExportOptions,
              log: Callable[[str], None] = print, client=None) -> dict[str, int]:
    """One pass over the matching studies; returns counts of processed, skipped and failed studies."""
    from fadal.navigation.pacs import predict_from_pacs

    client = client or connect(access)
    counts = {"processed": 0, "skipped": 0, "failed": 0}
    try:
        studies = find_studies(client, access, filters)
    except FadalInputError as err:
        log(f"error: {err}")
        counts["failed"] += 1
        return counts
    state = read_state(out)
    for study in studies:
        uid = study["study"]
        if uid in state["done"]:
            counts["skipped"] += 1
            continue
        try:
            ref = pick_ct_series(client, access, uid, largest=True)
            existing = segmentations_of(client, access, ref)
            if existing:
                state["done"][uid] = {"ct_series": ref.series_uid, "seg_series": existing[0], "by": "already in PACS"}
                write_json(state, out / STATE)
                counts["skipped"] += 1
                continue
            summary = predict_from_pacs(model, access, uid, out, ref.series_uid, options, client=client)
        except FadalInputError as err:
            log(f"error: study {uid}: {err}")
            counts["failed"] += 1
            continue
        except Exception as err:  # one study's unexpected failure must not stop the watch loop
            log(f"error: study {uid}: unexpected {type(err).__name__}: {err}")
            counts["failed"] += 1
            continue
        p = summary["pacs"]
        state["done"][uid] = {"ct_series": p["ct_series"], "seg_series": p["seg_series"],
                              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(state, out / STATE)
        counts["processed"] += 1
        log(f"study {uid} ({study['description'] or 'no description'}): SEG {p['seg_series']} stored, "
            f"organs {', '.join(summary['organs']) or 'none'}, {summary['seconds']['pacs_total']:.1f} s")
    return counts


def watch(model: LoadedModel, access: PacsAccess, out: Path, filters: dict[str, str], options: ExportOptions,
          interval: float = 30.0, once: bool = False, log: Callable[[str], None] = print,
          max_polls: int | None = None) -> dict[str, int]:
    """Poll every ``interval`` seconds (forever, or once); returns the last poll's counts."""
    out.mkdir(parents=True, exist_ok=True)
    polls = 0
    while True:
        counts = poll_once(model, access, out, filters, options, log)
        polls += 1
        if once or (max_polls is not None and polls >= max_polls):
            log(f"poll done: {counts['processed']} processed, {counts['skipped']} already done, "
                f"{counts['failed']} failed")
            return counts
        time.sleep(interval)
