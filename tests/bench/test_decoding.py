"""`tokenmill bench decoding`: constrained against unconstrained decoding in one engine."""

from __future__ import annotations

import json

import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main


@pytest.mark.engine
def test_decoding_compares_constrained_and_unconstrained_decoding(model_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "decoding", "--rows", "12", "--repeats", "1", *QUICK_START_ARGS, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio constrained/unconstrained, requests/s" in printed
    figures = json.loads(out.read_text())
    u, c = figures["unconstrained"], figures["constrained"]
    assert figures["task"] == "classify" and u["requests"] == c["requests"] == 12
    assert c["valid_share"] == 1.0, "constrained decoding must always give one of the labels"
    assert figures["ratio_requests_per_s"] == pytest.approx(c["requests_per_s"] / u["requests_per_s"])


def test_decoding_refuses_a_free_text_job(capsys):
    assert main(["bench", "decoding", "conf/jobs/ticket_triage.yaml"]) == 2
    assert "needs a classify or extract job" in capsys.readouterr().err
