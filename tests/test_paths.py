"""`pipelines.paths.build_folder_once`: processes racing to build one folder (engine actors preparing the embedded
model on first use) all succeed, and leave one complete folder and no temporary ones."""

from __future__ import annotations

import subprocess
import sys

RACER = """
import sys, time
from pathlib import Path
from pipelines.paths import build_folder_once

target, me, gate = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def build(tmp):
    (tmp / "weights").write_text(me)
    # Finish only once the other racer is building too: both really build.
    (gate / me).touch()
    deadline = time.monotonic() + 60
    while len(list(gate.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp / "DONE").write_text(me)

print(build_folder_once(target, build, marker="DONE"))
"""


def test_two_processes_racing_both_succeed_with_one_complete_folder(tmp_path):
    target, gate = tmp_path / "models" / "m", tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(target), name, str(gate)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == str(target)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"], "temporary folders left behind"
    winner = (target / "DONE").read_text()
    assert winner in ("a", "b") and (target / "weights").read_text() == winner, "the folder mixes two builds"
