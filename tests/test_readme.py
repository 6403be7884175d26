"""The README's examples run as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_leads_with_the_two_commands():
    first_block = README.read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "(32, 10)" in out


def test_docs_python_examples_run(capsys):
    for page in sorted((ROOT / "docs").glob("*.md")):
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
            exec(compile(code, str(page), "exec"), {})
    out = capsys.readouterr().out  # softsign and its derivative 1 / (1 + |x|)^2 at x = 3
    assert "0.75" in out and "0.0625" in out
