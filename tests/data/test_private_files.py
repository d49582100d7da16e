"""A site's local state and caches are written 0600 (folders 0700); ordinary outputs stay 0644."""

from __future__ import annotations

import stat

from fadal.data.io import PRIVATE, make_private, private_dir, save_torch, write_json


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_writes_and_folders(tmp_path):
    assert _mode(save_torch({"a": 1}, tmp_path / "state.pt", mode=PRIVATE)) == 0o600
    assert _mode(write_json({"a": 1}, tmp_path / "ledger.json", mode=PRIVATE)) == 0o600
    assert _mode(write_json({"a": 1}, tmp_path / "report.json")) == 0o644
    cache = private_dir(tmp_path / "cache" / "train")
    assert _mode(cache) == 0o700
    (cache / "sub").mkdir()
    (cache / "sub" / "volume.pt").write_bytes(b"x")  # as a library writes it: the umask's mode
    make_private(cache)
    assert _mode(cache / "sub") == 0o700 and _mode(cache / "sub" / "volume.pt") == 0o600
