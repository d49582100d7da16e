"""Errors every layer raises; this module imports nothing of FADAL's, so anything may import it."""

import re


class FadalInputError(ValueError):
    """Bad input: the message names the file and says what is wrong and what to do."""


class SiteRefusal(Exception):
    """A site refuses a message: it breaks the site's privacy policy, or answering it would disclose
    more than a site may send. ``rule`` is a fixed identifier from the code (no data in it): it is the
    only part that may reach the coordinator; ``detail`` stays in the site's own log."""

    def __init__(self, rule: str, detail: str) -> None:
        if not re.fullmatch(r"[a-z][a-z-]{0,40}", rule):
            raise ValueError(f"refusal rule {rule!r} must be a short lowercase identifier")
        super().__init__(f"refused ({rule}): {detail}")
        self.rule = rule
