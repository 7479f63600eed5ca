"""Every ```python block in README.md and docs/*.md runs as written (the docs stay true).

The blocks carry their own asserts: each checks what its text claims.
"""

import pathlib
import re

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[2]
_PAGES = [_REPO / "README.md", *sorted((_REPO / "docs").glob("*.md"))]
_BLOCKS = {f"{page.relative_to(_REPO)} block {i}": block
           for page in _PAGES
           for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(),
                                                flags=re.S))}


def test_every_page_with_examples_is_collected():
  pages = {name.split(" block ")[0] for name in _BLOCKS}
  assert {"README.md", "docs/distributed.md", "docs/variants.md", "docs/folding.md",
          "docs/flax.md", "docs/torch.md"} <= pages, sorted(pages)


@pytest.mark.parametrize("name", sorted(_BLOCKS))
def test_python_block_runs(name):
  exec(compile(_BLOCKS[name], name, "exec"), {})
