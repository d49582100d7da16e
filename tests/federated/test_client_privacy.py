"""What a site sends: model arrays and allow-listed scalar metrics, nothing else."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fadal_testing import LABELS, tiny_plan, write_site
from fadal.config import TrainConfig
from fadal.federated.site_task import (ALLOWED_METRICS, SiteRuntime, local_evaluate, local_fingerprint, local_train,
                                        reply)
from fadal.records import Fingerprint
from fadal.model.net import build_network

TINY = TrainConfig()
PLAN = tiny_plan((4, 8), spacing_mm=4.0)


def _message(model, labels=LABELS, message_type="train") -> Message:
    config = ConfigRecord({
        "local-steps": 2, "server-round": 1, "train-config": TINY.model_dump_json(),
        "plan": PLAN.model_dump_json(), "labels": json.dumps(labels),
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                   dst_node_id=1, message_type=message_type)


def _assert_only_arrays_and_scalars(reply_msg: Message, model, expect_arrays: bool) -> None:
    content = reply_msg.content
    assert set(content.keys()) == ({"arrays", "metrics"} if expect_arrays else {"metrics"})
    assert isinstance(content["metrics"], MetricRecord)
    for key, value in content["metrics"].items():
        assert key in ALLOWED_METRICS or key.startswith("dice-"), key
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    if expect_arrays:
        arrays = content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        state = model.state_dict()
        assert list(arrays.keys()) == list(state.keys())
        for k, arr in arrays.to_torch_state_dict().items():
            assert tuple(arr.shape) == tuple(state[k].shape)


def test_train_reply_holds_only_model_arrays_and_scalar_metrics(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=2, n_unlabeled=1, n_test=1)
    runtime = SiteRuntime("s", site, None, False, tmp_path / "cache")
    model = build_network(3, PLAN.network)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = local_train(_message(model), runtime)
    _assert_only_arrays_and_scalars(out, model, expect_arrays=True)
    assert out.content["metrics"]["num-examples"] == 2
    changed = [k for k, v in out.content["arrays"].to_torch_state_dict().items() if not np.allclose(v, before[k])]
    assert changed, "local training did not change the model"
    # No string anywhere in the reply could carry a case id or a path.
    blob = repr(dict(out.content["metrics"].items()))
    assert "case_" not in blob and str(tmp_path) not in blob


def test_evaluate_reply_holds_only_scalar_metrics(tmp_path):
    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=1)
    runtime = SiteRuntime("s", site, None, False, tmp_path / "cache")
    model = build_network(3, PLAN.network)
    out = local_evaluate(_message(model, message_type="evaluate"), runtime)
    _assert_only_arrays_and_scalars(out, model, expect_arrays=False)
    assert "dice-mean" in out.content["metrics"]


def test_reply_refuses_non_allowlisted_metric():
    from fadal.errors import SiteRefusal

    model = build_network(3, PLAN.network)
    with pytest.raises(SiteRefusal, match="non-allow-listed"):
        reply(_message(model), {"case_000-volume": 1.0})
    # dice-* is pinned to the federation's organs: no per-case (or any other) key hides behind it.
    organs = ("organA", "organB")
    for key in ("dice-case_007", "dice-organC", "dice-"):
        with pytest.raises(SiteRefusal, match="non-allow-listed"):
            reply(_message(model), {key: 0.5}, organs=organs)
    sent = reply(_message(model), {"dice-organA": 0.5, "dice-mean": 0.5, "num-examples": 1}, organs=organs)
    assert set(sent.content["metrics"]) == {"dice-organA", "dice-mean", "num-examples"}


def test_label_set_mismatch_is_a_clear_error(tmp_path):
    from fadal.errors import FadalInputError

    site = write_site(tmp_path / "site", n_labeled=1, n_unlabeled=0, n_test=0)
    runtime = SiteRuntime("s", site, None, False, tmp_path / "cache")
    labels = {"background": 0, "liver": 1, "spleen": 2}
    model = build_network(3, PLAN.network)
    with pytest.raises(FadalInputError, match="label-set mismatch"):
        local_train(_message(model, labels=labels), runtime)


def test_fingerprint_reply_holds_aggregate_statistics_only(tmp_path):
    """The planning query is answered with one validated Fingerprint record: no case id, no path, no
    per-case list (spacing and extent as percentiles, HU pooled, organ volumes as a range)."""
    site = write_site(tmp_path / "site", n_labeled=3, n_unlabeled=2, n_test=1)
    runtime = SiteRuntime("s", site, None, False, tmp_path / "cache")
    query = Message(RecordDict({"config": ConfigRecord({"task": "fingerprint", "labels": json.dumps(LABELS)})}),
                    dst_node_id=1, message_type="query")
    out = local_fingerprint(query, runtime)
    assert set(out.content.keys()) == {"fingerprint"}
    record = out.content["fingerprint"]
    assert set(record.keys()) == {"fingerprint"}
    text = str(record["fingerprint"])
    fp = Fingerprint.model_validate_json(text)  # exactly the record's fields, nothing more
    assert fp.scans == 5 and fp.labeled_scans == 3  # the held-out scan is not measured
    assert fp.spacing_mm.p50 == (2.0, 2.0, 3.0)
    assert set(fp.organ_volume_ml) == {"organA", "organB"}
    assert "case_" not in text and str(tmp_path) not in text
