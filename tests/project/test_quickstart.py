"""The README's and home page's example is the quickstart's, and it works pasted into a prompt.

tests/project/test_readme.py runs every python block as a script; a prompt is stricter (a
blank line ends a compound statement, a dedent without one is a syntax error), so
the example is also fed line by line to `code.InteractiveConsole`, as a paste is.
"""

import code
import pathlib
import re

_REPO = pathlib.Path(__file__).resolve().parents[2]


def first_python_block(page: str) -> str:
  return re.search(r"```python\n(.*?)```", (_REPO / page).read_text(), flags=re.S).group(1)


def test_readme_and_home_page_examples_are_the_quickstart():
  quickstart = first_python_block("docs/quickstart.md")
  assert first_python_block("README.md") == quickstart
  assert first_python_block("docs/index.md") == quickstart


class _Prompt(code.InteractiveConsole):
  """A console that records errors instead of printing them."""

  def __init__(self):
    super().__init__(locals={})
    self.errors = []

  def showsyntaxerror(self, filename=None, **kwargs):
    self.errors.append("SyntaxError")

  def showtraceback(self):
    import sys
    self.errors.append(repr(sys.exc_info()[1]))


def test_quickstart_pasted_into_a_prompt():
  prompt = _Prompt()
  more = False
  for line in first_python_block("docs/quickstart.md").splitlines():
    more = prompt.push(line)
  if more:
    prompt.push("")
  assert not prompt.errors, prompt.errors
  assert int(prompt.locals["bn_state"].count) == 3
  # The failing case is caught: a top-level statement right after a block.
  broken = _Prompt()
  for line in ["for i in range(2):", "  pass", "j = 1"]:
    broken.push(line)
  assert broken.errors == ["SyntaxError"]
