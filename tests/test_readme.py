"""The README's Python snippets run as written.

Every ```python block of the "Python API" and "Quantization" sections of README.md is executed,
in a temporary working directory (the snippets write small files), one namespace per section
(the blocks of a section run in order, as a reader would paste them). The snippets use the
bundled photos and the shipped tiny models, so this takes seconds; if an API they show changes,
this test fails and the README has to follow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Python API", "Quantization")


def python_blocks(section: str) -> list[str]:
    """The bodies of the ```python blocks under ``## <section>`` (up to the next ``## ``)."""
    text = README.read_text(encoding="utf-8")
    match = re.search(
        rf"^## {re.escape(section)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL
    )
    assert match, f"README.md has no '## {section}' section"
    blocks = re.findall(
        r"^```python[ \t]*\n(.*?)^```[ \t]*$", match.group(1), flags=re.MULTILINE | re.DOTALL
    )
    assert blocks, f"README.md section '{section}' has no ```python block"
    return blocks


def test_sections_have_python_blocks() -> None:
    for section in SECTIONS:
        assert python_blocks(section)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_snippets_run(
    section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, code in enumerate(python_blocks(section), start=1):
        exec(compile(code, f"README.md ({section}, block {i})", "exec"), namespace)
    capsys.readouterr()  # the snippets print; keep the test output quiet
