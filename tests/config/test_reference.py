"""The README's configuration reference is the one the config models render now."""

from pathlib import Path

from pipelines.config.reference import BEGIN, END, render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current():
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render(), "run `tokenmill reference` and paste it into README.md"
