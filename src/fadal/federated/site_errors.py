"""Errors leave a site as opaque codes; the full message stays in the site's own log.

Flower turns an exception raised in a ClientApp into an error reply whose reason is
``str(exception)`` and the coordinator's strategy logs it into the ServerApp log (which ``fadal
federate`` streams). FADAL's messages are written for the hospital's operator: they name files
(case ids), the site's label set, its number of volumes, a model's values. So the outermost mod of
the ClientApp (:func:`opaque_errors`, outside SecAgg+'s) catches every exception, logs it in full
here, and replies with a code only:

``FADAL-E-<KIND>-<ref>``: KIND is ``INPUT`` (bad site data or configuration), ``REFUSED-<rule>``
(the site's policy or the disclosure rules refused the message; the rule is a fixed name from the
code, see :mod:`fadal.federated.policy`), or ``INTERNAL``; ``ref`` is 4 random hex digits, also in
the site's log line, so the two operators can talk about one failure. It is random, not a hash of
the message, so it cannot confirm a guess about what the message said.
"""

from __future__ import annotations

import secrets
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from fadal.errors import FadalInputError, SiteRefusal


def error_code(err: BaseException) -> str:
    """The only description of ``err`` the coordinator gets."""
    if isinstance(err, SiteRefusal):
        kind = f"REFUSED-{err.rule}"
    elif isinstance(err, FadalInputError):
        kind = "INPUT"
    else:
        kind = "INTERNAL"
    return f"FADAL-E-{kind}-{secrets.token_hex(2)}"


def opaque_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: any exception becomes an error reply carrying :func:`error_code` only."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - everything, or Flower would send str(err)
        code = error_code(err)
        log(ERROR, "%s (%s message; this text stays at the site): %s: %s", code, msg.metadata.message_type,
            type(err).__name__, err, exc_info=err)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=msg)
