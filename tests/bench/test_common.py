"""The bench's child processes hand their figures back as typed data through a file, never through their output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipelines.bench import common


@dataclasses.dataclass
class Figures:
    requests: int
    seconds: float


def test_a_child_result_is_read_back_into_its_dataclass(tmp_path, monkeypatch):
    written = {}

    def fake_run(cmd, env, capture_output, text):
        args = json.loads(Path(cmd[-1]).read_text())
        written.update(args)
        # The child prints noise, even a line that looks like figures; only the file counts.
        common.write_result(args, Figures(requests=3, seconds=1.5))

        class Done:
            returncode, stderr, stdout = 0, "", '{"requests": 99}\n'

        return Done()

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    job = type("J", (), {"engine": None})()
    got = common.run_child(job, tmp_path, "raw", {"x": 1}, Figures, engine_in_child=False,
                             join={"RAY_ADDRESS": "127.0.0.1:1"})
    assert got == Figures(requests=3, seconds=1.5)
    assert written["mode"] == "raw" and written["x"] == 1 and written["result_file"].endswith("raw-result.json")
