"""Fixtures of the integration tests: a real PACS (Orthanc + DICOMweb) when the Debian packages are installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from orthanc_pacs import EXAMPLE_DICOM, ORTHANC, dicomweb_plugin, stamp_example_series, start_orthanc


def _require_orthanc() -> None:
    if not Path(ORTHANC).exists():
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    if dicomweb_plugin() is None:
        pytest.skip("Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb)")
    if not EXAMPLE_DICOM.is_dir():
        pytest.skip(f"example DICOM series not found at {EXAMPLE_DICOM}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc holding the example CT series (``orthanc.uploaded``: its study/series/frame UIDs)."""
    _require_orthanc()
    root = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(root / "pacs")
    try:
        uids = stamp_example_series(root / "example")
        server.upload(sorted(Path(uids["folder"]).iterdir()))
        server.uploaded = uids
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_factory(tmp_path):
    """Start extra Orthancs (e.g. one with authentication) that are stopped after the test."""
    _require_orthanc()
    started = []

    def start(name: str, **kwargs):
        server = start_orthanc(tmp_path / name, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def pacs_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained network for the example CT's label set that answers "liver" inside the body crop
    (so every export has an organ), saved as a FADAL checkpoint."""
    from fadal.config import TrainConfig
    from fadal.model.infer import save_checkpoint
    from fadal.model.net import build_network
    from fadal_testing import tiny_plan

    names = json.loads((EXAMPLE_DICOM.parent / "labels.json").read_text())["labels"]
    labels = {k: i for i, k in enumerate(["background", *names])}
    plan = tiny_plan((4, 8, 16), spacing_mm=4.0, patch=(64, 64, 16))  # the example is 20 slices of 3 mm
    model = build_network(len(labels), plan.network)
    last_bias = [k for k in model.state_dict() if k.endswith("bias")][-1]
    with torch.no_grad():
        model.state_dict()[last_bias][labels["liver"]] += 50.0
    return save_checkpoint(model, tmp_path_factory.mktemp("pacs_model") / "model.pt", labels, plan, TrainConfig())
