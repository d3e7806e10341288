"""A bench side's child process: `python -m pipelines.bench ARGS_FILE` (see `pipelines.bench.common.run_child`)."""

import json
import sys
from pathlib import Path

from pipelines.bench import calibrate, decoding, throughput

SIDES = {
    "raw": throughput.raw_side,
    "pipeline": throughput.pipeline_side,
    "ray_data_llm": throughput.ray_data_llm_side,
    "transformers": throughput.transformers_side,
    "constrained": decoding.constrained_side,
    "calibrate": calibrate.calibrate_side,
}

if __name__ == "__main__":
    args = json.loads(Path(sys.argv[1]).read_text())
    SIDES[args["mode"]](args)
