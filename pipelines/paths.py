"""Where tokenmill keeps its caches and finds its configuration."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

#: The repository's own `conf/` folder; used when a job spec does not sit in a conf tree.
REPO_DIR = Path(__file__).resolve().parents[1]
REPO_CONF_DIR = REPO_DIR / "conf"


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


def build_folder_once(target: Path, build: Callable[[Path], None], *, marker: str, force: bool = False) -> Path:
    """Build `target` with `build(tmp)` unless it is complete (holds `marker`); return it.

    The folder is built in a temporary sibling and renamed into place, so
    processes racing to build it all end with one complete folder, and a reader
    never sees a half-written one. `build` must write `marker` last.
    """
    if (target / marker).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is complete (it renamed
            # only after writing the marker), so ours is not needed.
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
