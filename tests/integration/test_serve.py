"""`fadal serve --dicomweb --once` against a real Orthanc: each planning study is segmented once, a failing
study is one error line that does not stop the pass, and a second pass (or a restart without the state
file) does nothing."""

from __future__ import annotations

from pathlib import Path

from orthanc_pacs import stamp_example_series
from typer.testing import CliRunner

from fadal.cli import app

runner = CliRunner()


def test_serve_processes_each_planning_study_once(orthanc_factory, pacs_checkpoint, tmp_path):
    pacs = orthanc_factory("serve_pacs")
    good = stamp_example_series(tmp_path / "good", "CT abdomen PLANNING", tag="serve-good")
    gap = stamp_example_series(tmp_path / "gap", "CT planning, re-export", tag="serve-gap", drop_slice=7)
    other = stamp_example_series(tmp_path / "other", "CT follow-up", tag="serve-other")
    for s in (good, gap, other):
        pacs.upload(sorted(Path(s["folder"]).iterdir()))
    out = tmp_path / "nav"
    cmd = ["serve", "--dicomweb", pacs.dicomweb, "--model", str(pacs_checkpoint), "--out", str(out), "--once",
           "--no-views"]

    first = runner.invoke(app, cmd)
    assert first.exit_code == 0, first.output
    text = " ".join(first.output.split())
    assert f"study {good['study']}" in text and "SEG" in text and "stored" in text
    assert f"error: study {gap['study']}" in text and "missing slices?" in text
    assert other["study"] not in text  # not tagged for planning
    assert "1 processed, 0 already done, 1 failed" in text
    assert (out / "serve_state.json").is_file() and (out / good["series"] / "seg.dcm").is_file()
    segs = pacs.get(f"/studies/{_orthanc_id(pacs, good['study'])}/series")
    assert sorted(s["MainDicomTags"]["Modality"] for s in segs) == ["CT", "SEG"]

    second = runner.invoke(app, cmd)
    assert second.exit_code == 0, second.output
    assert "0 processed, 1 already done, 1 failed" in " ".join(second.output.split())

    (out / "serve_state.json").unlink()  # a restart elsewhere: the PACS's SEG still marks the study done
    third = runner.invoke(app, cmd)
    assert "0 processed, 1 already done, 1 failed" in " ".join(third.output.split()), third.output
    assert len(pacs.get(f"/studies/{_orthanc_id(pacs, good['study'])}/series")) == 2  # no second SEG


def _orthanc_id(pacs, study_uid: str) -> str:
    import requests

    r = requests.post(f"{pacs.rest}/tools/lookup", data=study_uid, auth=pacs.auth, timeout=10)
    r.raise_for_status()
    return next(x["ID"] for x in r.json() if x["Type"] == "Study")


def test_serve_keeps_running_when_the_pacs_is_down(pacs_checkpoint, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = runner.invoke(app, ["serve", "--dicomweb", f"http://127.0.0.1:{closed}/dicom-web", "--model",
                                 str(pacs_checkpoint), "--out", str(tmp_path / "nav"), "--once"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "PACS unreachable" in text and "0 processed, 0 already done, 1 failed" in text
