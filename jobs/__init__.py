"""Job entry points: `python -m jobs.<name>`, also the entrypoint of `ray job submit`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

CONF_JOBS = Path(__file__).resolve().parents[1] / "conf" / "jobs"


def main_for(job_name: str, argv: Sequence[str] | None = None) -> int:
    """`tokenmill run conf/jobs/<job_name>.yaml` with the remaining arguments."""
    from pipelines.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    return main(["run", str(CONF_JOBS / f"{job_name}.yaml"), *args])
