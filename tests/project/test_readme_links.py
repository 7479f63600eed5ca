"""Every relative link of README.md and CHANGELOG.md points at a file of the repository.

(mkdocs build --strict checks the links of docs/; these two pages live outside it.)
"""

import pathlib
import re

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md"])
def test_relative_links_resolve(page):
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (_REPO / page).read_text())
  relative = [t for t in targets if "://" not in t]
  missing = [t for t in relative if not (_REPO / t).exists()]
  assert not missing, missing
  if page == "README.md":
    assert len(relative) > 10
