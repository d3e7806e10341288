"""The entry point of a job sent by `tokenmill submit` or the Airflow DAG: runs the spec shipped with it.

    python -m jobs.shipped --spec-sha256 HEX --date YYYY-MM-DD [tokenmill run options]

The spec comes in the job's runtime_env (`TOKENMILL_JOB_SPEC`), as the submitter
checked it; the digest in the entrypoint (which `ray job list` shows) must match it.
Engine profiles and prices come from the working directory that travelled with it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from pipelines.paths import REPO_CONF_DIR
from pipelines.run.submit import SPEC_ENV, spec_digest


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.cli import main as cli

    parser = argparse.ArgumentParser(prog="python -m jobs.shipped")
    parser.add_argument("--spec-sha256", required=True)
    known, rest = parser.parse_known_args(argv)
    text = os.environ.get(SPEC_ENV)
    if text is None:
        print(f"jobs.shipped: error: {SPEC_ENV} is not set: submit the job with `tokenmill submit`", file=sys.stderr)
        return 2
    if spec_digest(text) != known.spec_sha256:
        print(f"jobs.shipped: error: the spec in {SPEC_ENV} is not the one submitted (sha256 "
              f"{spec_digest(text)[:12]}, the entrypoint says {known.spec_sha256[:12]})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tokenmill-spec-") as folder:
        spec = Path(folder) / "job.yaml"
        spec.write_text(text)
        # The conf/ of the working directory that travelled with the job, where the job runs from one.
        conf = Path("conf").resolve() if Path("conf/engines").is_dir() else REPO_CONF_DIR
        return cli(["run", str(spec), "--conf-dir", str(conf), *rest])


if __name__ == "__main__":
    sys.exit(main())
