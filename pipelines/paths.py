"""Where tokenmill keeps its caches and finds its configuration."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository's own `conf/` folder; used when a job spec does not sit in a conf tree.
REPO_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tokenmill_home() -> Path:
    """The cache folder: `$TOKENMILL_HOME`, else `~/.cache/tokenmill`."""
    home = os.environ.get("TOKENMILL_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "tokenmill"


def conf_dir_for(job_path: Path, explicit: Path | None = None) -> Path:
    """The conf folder whose `engines/` and `prices.yaml` a job spec uses.

    Order: the explicit folder, `$TOKENMILL_CONF_DIR`, the folder above the job
    spec's own (`conf/jobs/x.yaml` -> `conf/`) when it holds `engines/`, and
    last the repository's `conf/`.
    """
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("TOKENMILL_CONF_DIR"):
        return Path(os.environ["TOKENMILL_CONF_DIR"])
    parent = job_path.resolve().parent.parent
    if (parent / "engines").is_dir():
        return parent
    return REPO_CONF_DIR
