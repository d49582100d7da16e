"""``flower-superlink`` with a longer SQLite lock wait and an operator token on its Control API: what
`fadal server` runs.

Flower 1.42 keeps the SuperLink's state in SQLite and waits at most 5 s for the database lock
(``busy_timeout``). On a busy coordinator (measured here: three SuperNodes training on the same 2-core
machine, load ~5) a SuperNode's upload then fails with HTTP 500 "database is locked" and that
hospital's update is lost for the round. Waiting up to 60 s costs nothing when the lock is free.

Flower 1.42 serves the Control API (``flwr run``, ``flwr ls``, ``flwr stop``, ``flwr supernode register``)
on the same port as the Fleet API the hospitals' SuperNodes use, and without an account plugin (open
source Flower has only OIDC, which needs an identity provider) it accepts every caller.
``--fadal-control-digest FILE`` (the SHA-256 that ``fadal certs`` writes beside ``server.key``) installs
:class:`OperatorTokenPlugin` as Flower's ``ControlAuthnPlugin``: Flower's own middleware then refuses
(HTTP 401) every Control API call whose ``Authorization: Bearer`` token does not hash to it. The ``flwr``
CLI sends that header from its credential store (``$FLWR_HOME/credentials.yaml``, see
:func:`fadal.federated.flower_cli.write_connection`). Fleet API and ServerApp runtime paths are not
touched. Everything else is Flower's own entry point, unchanged.
"""

from __future__ import annotations

import hmac
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, REFRESH_TOKEN_KEY
from flwr.supercore import constant, sql_mixin
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.utils import get_metadata_str
from flwr.superlink.auth_plugin import ControlAuthnPlugin

from fadal.federated.certificates import control_digest

BUSY_TIMEOUT_MS = 60_000
#: The wrapper's own flag (taken out of argv before Flower parses it): the operator token's SHA-256 file.
DIGEST_FLAG = "--fadal-control-digest"

_PRAGMAS = tuple((k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in constant.SQLITE_PRAGMAS)
constant.SQLITE_PRAGMAS = _PRAGMAS
sql_mixin.SQLITE_PRAGMAS = _PRAGMAS  # read at each new connection


class OperatorTokenPlugin(ControlAuthnPlugin):
    """A Control API caller is the coordinator's operator iff its bearer token's SHA-256 is ``digest``.

    The operator gets Flower's no-auth account (``NOOP_FLWR_AID``): the one open-source Flower's federation
    manager knows, so runs in a database from before keep working. There is no login flow (``flwr login``
    is refused): the token is a file the coordinator already holds.
    """

    def __init__(self, digest: str) -> None:  # pylint: disable=super-init-not-called
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("the operator token digest must be 64 lowercase hex digits (SHA-256)")
        self._digest = digest

    def _matches(self, metadata: Sequence[tuple[str, str | bytes]], key: str) -> bool:
        token = get_metadata_str(metadata, key)
        return token is not None and hmac.compare_digest(control_digest(token), self._digest)

    @staticmethod
    def _operator() -> AccountInfo:
        return AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "FADAL SuperLink: no login; the operator token is a file")

    def validate_tokens_in_metadata(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[bool, AccountInfo | None]:
        ok = self._matches(metadata, ACCESS_TOKEN_KEY)
        return ok, (self._operator() if ok else None)

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, "FADAL SuperLink: no login; the operator token is a file")

    def refresh_tokens(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        # The CLI refreshes only after a 401, i.e. when its token was refused: the same token stays refused.
        if not self._matches(metadata, REFRESH_TOKEN_KEY):
            return None, None
        token = get_metadata_str(metadata, REFRESH_TOKEN_KEY)
        return [(ACCESS_TOKEN_KEY, token), (REFRESH_TOKEN_KEY, token)], self._operator()


def read_digest(path: str | Path) -> str:
    return Path(path).read_text().strip()


def _take_digest_flag(argv: list[str]) -> tuple[list[str], str | None]:
    rest, digest_file = [], None
    it = iter(argv)
    for arg in it:
        if arg == DIGEST_FLAG:
            digest_file = next(it, None)
        elif arg.startswith(DIGEST_FLAG + "="):
            digest_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, digest_file


def install(digest: str) -> OperatorTokenPlugin:
    """Make Flower's SuperLink use :class:`OperatorTokenPlugin` (its CLI builds the plugin at start)."""
    plugin = OperatorTokenPlugin(digest)
    _flower_superlink_module().load_control_authn_plugin = lambda: plugin
    return plugin


def _flower_superlink_module():
    # The module, not the function of the same name that flwr.superlink.cli exports.
    return importlib.import_module("flwr.superlink.cli.flower_superlink")


def main() -> int | None:
    argv, digest_file = _take_digest_flag(sys.argv[1:])
    if digest_file is None:
        sys.exit(f"fadal.federated.superlink: {DIGEST_FLAG} FILE is required (the operator token's SHA-256 "
                 f"from `fadal certs`): without it anyone who reaches the port could submit a run")
    try:
        install(read_digest(digest_file))
    except (OSError, ValueError) as err:
        sys.exit(f"fadal.federated.superlink: {digest_file}: {err}")
    sys.argv = ["flower-superlink", *argv]
    return _flower_superlink_module().flower_superlink()


if __name__ == "__main__":
    sys.exit(main())
