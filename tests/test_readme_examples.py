"""The README's examples run as written (each ```python block whose first line is ``# example: NAME``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = dict(re.findall(r"```python\n# example: ([^\n]+)\n(.*?)```", README.read_text(), flags=re.S))


def test_the_readme_has_examples():
    assert {"hints", "student on the teacher's features"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = EXAMPLES[name].replace("/tmp/", f"{tmp_path}/")  # keep the example's files in the test's directory
    exec(compile(code, f"README.md example {name!r}", "exec"), {"__name__": "__readme__"})
    assert "accuracy" in capsys.readouterr().out
