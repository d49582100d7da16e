"""The registration cache and the stored result: keys by content, strict (de)serialisation, schema versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from fadal.amplify.cache import CACHE_SCHEMA, entry_paths, load_cached, pair_key, store
from fadal.amplify.result import RegistrationResult
from fadal.config import RegistrationConfig
from fadal.errors import FadalInputError


def _result(tmp_path: Path, key: str = "k") -> RegistrationResult:
    f = tmp_path / "fixed.nii.gz"
    return RegistrationResult(fixed=f, moving=f, warped_label=f, metric_before=0.1, metric_after=0.7, seconds=1.5,
                              cached=False, atlas_label=f, key=key, metric_init=0.5, body_dice=0.9, overlap=0.95,
                              init_translation_mm=(1.0, 2.0, 3.0))


def test_result_round_trips_and_an_unknown_key_is_an_error_naming_it(tmp_path):
    res = _result(tmp_path)
    assert RegistrationResult.from_json(json.loads(json.dumps(res.to_json()))) == res
    with pytest.raises(ValueError, match="'dice_typo'"):
        RegistrationResult.from_json({**res.to_json(), "dice_typo": 0.5})


def test_store_then_load_and_what_counts_as_a_miss(tmp_path):
    out = tmp_path / "reg"
    img = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    store(_result(tmp_path), img, sitk.Cast(img, sitk.sitkFloat32), out, {"recipe": "test"})
    js, nii, image = entry_paths("k", out)
    stored = json.loads(js.read_text())
    assert stored["schema"] == CACHE_SCHEMA and stored["recipe"] == "test" and stored["result"]["key"] == "k"
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    hit = load_cached("k", out, a, b, c)
    assert hit.cached and (hit.fixed, hit.moving, hit.atlas_label) == (a, b, c)  # the names the caller passed
    assert (hit.warped_label, hit.warped_image) == (nii, image) and hit.metric_after == 0.7

    assert load_cached("other", out, a, b, c) is None  # no entry
    js.write_text(json.dumps({**stored, "schema": CACHE_SCHEMA - 1}))
    assert load_cached("k", out, a, b, c) is None  # another layout: registered again
    js.write_text("{ half-written")
    assert load_cached("k", out, a, b, c) is None  # unreadable: registered again
    # This layout, but a result that does not parse: a bug, said loudly with the file.
    js.write_text(json.dumps({**stored, "result": {**stored["result"], "dice_typo": 1}}))
    with pytest.raises(FadalInputError, match="dice_typo") as err:
        load_cached("k", out, a, b, c)
    assert str(js) in str(err.value)


def test_pair_key_follows_content_not_names_and_names_a_missing_file(tmp_path):
    files = []
    for name, data in (("f", b"fixed"), ("a", b"atlas"), ("l", b"label")):
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    cfg = RegistrationConfig(workers=1)
    key = pair_key(*files, cfg)
    copy = tmp_path / "copy"
    copy.write_bytes(b"fixed")
    assert pair_key(copy, files[1], files[2], cfg) == key
    assert pair_key(files[1], files[0], files[2], cfg) != key
    with pytest.raises(FadalInputError, match="missing"):
        pair_key(tmp_path / "missing", files[1], files[2], cfg)
