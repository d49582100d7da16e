"""``flower-superlink`` with a longer SQLite lock wait: what `fadal server` runs.

Flower 1.42 keeps the SuperLink's state in SQLite and waits at most 5 s for the database lock
(``busy_timeout``). On a busy coordinator (measured here: three SuperNodes training on the same 2-core
machine, load ~5) a SuperNode's upload then fails with HTTP 500 "database is locked" and that
hospital's update is lost for the round. Waiting up to 60 s costs nothing when the lock is free.
Everything else is Flower's own entry point, unchanged.
"""

from __future__ import annotations

import sys

from flwr.supercore import constant, sql_mixin

BUSY_TIMEOUT_MS = 60_000

_PRAGMAS = tuple((k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in constant.SQLITE_PRAGMAS)
constant.SQLITE_PRAGMAS = _PRAGMAS
sql_mixin.SQLITE_PRAGMAS = _PRAGMAS  # read at each new connection


def main() -> int | None:
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    return flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
