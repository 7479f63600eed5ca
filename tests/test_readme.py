"""Every ```python block in README.md runs as written (README stays true)."""

import pathlib
import re

import pytest

_README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", _README.read_text(), flags=re.S)


def test_readme_has_examples():
  assert len(_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(_BLOCKS)))
def test_readme_python_block_runs(index):
  exec(compile(_BLOCKS[index], f"README.md block {index}", "exec"), {})
