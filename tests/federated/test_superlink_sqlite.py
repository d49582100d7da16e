"""The SuperLink `fadal server` starts waits 60 s, not Flower's 5 s, for its SQLite lock."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sqlite3
import fadal.federated.superlink
from flwr.supercore import sql_mixin
conn = sqlite3.connect(':memory:')
sql_mixin._set_sqlite_pragmas(conn, None)  # Flower's own connect hook
print(conn.execute('PRAGMA busy_timeout').fetchone()[0])
"""


def test_superlink_sqlite_lock_wait_is_raised():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 60_000
    # Without our module Flower's default applies (the probe measures something real).
    plain = subprocess.run([sys.executable, "-c", PROBE.replace("import fadal.federated.superlink\n", "")],
                           capture_output=True, text=True, timeout=120)
    assert int(plain.stdout.split()[-1]) == 5_000
