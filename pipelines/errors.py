"""Errors a user can act on, one type per kind.

The CLI prints the message of a `TokenmillError` and exits non-zero, with no
traceback: every message must say which file, key, column or row is wrong.
"""


class TokenmillError(Exception):
    """Base of every error the CLI reports as a message rather than a traceback."""

    exit_code = 1


class ConfigError(TokenmillError):
    """A job spec, engine profile or price book is invalid (names the file and key)."""

    exit_code = 2


class InputError(TokenmillError):
    """Input data cannot be used as the spec says (names the file and column)."""

    exit_code = 3


class ModelError(TokenmillError):
    """The model cannot be prepared or found."""

    exit_code = 4


class EngineError(TokenmillError):
    """The inference engine failed as a whole (not one record)."""

    exit_code = 5


class RunAborted(TokenmillError):
    """The circuit breaker stopped a run: too many records failed. What was committed stays valid."""

    exit_code = 6


class RunBusy(TokenmillError):
    """Another attempt holds the run's lease, or took it from this one: one attempt at a time commits to a run."""

    exit_code = 7


class GateFailed(TokenmillError):
    """A drift gate was breached: the run is committed and kept, and `_SUCCESS` records `gate_failed`."""

    exit_code = 8


class BudgetSpent(TokenmillError):
    """The run's budget stopped it: what was committed stays; a higher cap resumes it."""

    exit_code = 9
