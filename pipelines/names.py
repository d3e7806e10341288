"""The two names a run is known by, checked where they come in: the night (`--date`) and the run id (`--run-id`).

Python's own date parser reads `20261127` and `2026-W48-5` as the same day as
`2026-11-27`, yet each text would name another run and another folder; and a
run id is a folder name under `output.path`, so a separator or `..` in it would
reach outside the run's own folder.
"""

from __future__ import annotations

import datetime as dt
import re

NIGHT = re.compile(r"\d{4}-\d{2}-\d{2}")
# A folder name on every store: letters, digits and `._=-`, not starting with a dot, at most 128 characters.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")


def night_problem(text: str) -> str | None:
    """Why `text` is not a night as `YYYY-MM-DD` (a real day, written that one way); None when it is one."""
    if not NIGHT.fullmatch(text):
        return f"--date {text!r}: expected a date as YYYY-MM-DD"
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return f"--date {text!r}: no such day"
    return None


def run_id_problem(text: str) -> str | None:
    """Why `text` cannot be a run id (a single folder name); None when it can."""
    if not RUN_ID.fullmatch(text) or ".." in text:
        return (f"--run-id {text!r}: use 1 to 128 letters, digits and . _ = - (not starting with a dot, "
                "no '..'): it names the run's folder")
    return None
