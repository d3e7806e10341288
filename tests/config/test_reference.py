"""docs/reference.md's configuration reference is the one the config models render now."""

from pathlib import Path

from pipelines.config.reference import BEGIN, END, render

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_the_reference_is_current():
    text = REFERENCE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render(), "run `tokenmill reference` and paste it into docs/reference.md"
