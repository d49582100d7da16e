"""`fadal predict --dicomweb`: one CT series from the PACS, segmented, and its DICOM-SEG stored back.

The series is retrieved (WADO-RS) into ``out/<series>/source_dicom/``, segmented by
:func:`fadal.navigation.predict.predict_case` exactly as a DICOM folder is (label map, meshes, views, a SEG
referencing the retrieved instances), then the SEG is stored (STOW-RS) in the CT's study.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from fadal.data.dicomweb import (PacsAccess, SeriesRef, connect, pick_ct_series, retrieve_series, store_instance)
from fadal.data.io import write_json
from fadal.navigation.model_package import LoadedModel
from fadal.navigation.predict import ExportOptions, predict_case


def predict_from_pacs(model: LoadedModel, access: PacsAccess, study_uid: str, out: Path,
                      series_uid: str | None = None, options: ExportOptions | None = None, client=None,
                      largest: bool = False) -> dict:
    """Retrieve, segment, store; returns predict_case's summary with the PACS steps' seconds added
    (``seconds.retrieve``, ``seconds.store``, ``seconds.pacs_total``) and ``stored_seg`` (its UIDs)."""
    client = client or connect(access)
    t0 = time.perf_counter()
    ref = pick_ct_series(client, access, study_uid, series_uid, largest=largest)
    case_id = ref.series_uid
    source = retrieve_series(client, access, ref, out / case_id / "source_dicom")
    t_retrieved = time.perf_counter()
    options = replace(options or ExportOptions(), dicom_seg=True)
    summary = predict_case(model.network, model.labels, model.plan, source, case_id, out, options,
                           series_uid=ref.series_uid)
    t_segmented = time.perf_counter()
    seg_path = Path(summary["outputs"]["dicom_seg"])
    store_instance(client, access, seg_path)
    t_stored = time.perf_counter()
    summary["pacs"] = _pacs_record(access, ref, seg_path)
    summary["seconds"].update(retrieve=t_retrieved - t0, store=t_stored - t_segmented, pacs_total=t_stored - t0)
    write_json(summary, out / case_id / "summary.json")
    return summary


def _pacs_record(access: PacsAccess, ref: SeriesRef, seg_path: Path) -> dict:
    import pydicom

    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    return {"url": access.shown_url, "study": ref.study_uid, "ct_series": ref.series_uid,
            "seg_series": str(seg.SeriesInstanceUID), "seg_instance": str(seg.SOPInstanceUID)}
