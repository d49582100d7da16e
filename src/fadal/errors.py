"""Errors every layer raises; this module imports nothing of FADAL's, so anything may import it."""


class FadalInputError(ValueError):
    """Bad input: the message names the file and says what is wrong and what to do."""
