"""A bench side's child process: `python -m pipelines.bench ARGS_FILE`."""

import sys

from pipelines.bench.common import child_side

child_side(sys.argv[1])
