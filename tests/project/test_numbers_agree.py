"""Numbers quoted next to a benchmark command agree with that command's output in BENCHMARKS.md.

BENCHMARKS.md holds each benchmark's printed tables under the command that printed them.
Any paragraph or table row of README.md, docs/*.md or BENCHMARKS.md's own prose that
names one of those commands may only quote numbers (`7,203`, `1.65`, `99.28%`) that
appear in that command's section of BENCHMARKS.md, so a rerun that changes the tables
makes every stale copy fail here until it is updated.
"""

import pathlib
import re

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[2]
_BENCHMARKS = (_REPO / "BENCHMARKS.md").read_text()

# Each command (a regex of how it is quoted) -> the BENCHMARKS.md section with its output,
# from the section's heading to the next heading of the same or a higher level.
_SOURCES = {
    r"benchmarks\.train_step(?!_)": "### MNIST CNN (benchmarks/train_step.py)",
    r"benchmarks\.train_step_resnet": "### ResNet-20 and ResNet-18",
    r"benchmarks\.peers": "## The MNIST CNN end to end",
    r"benchmarks\.input_pipeline": "## Feeding the accelerators",
}

# Pages whose copies are known to be stale, with the fix; each entry fails (strict xfail)
# as soon as the page agrees again, so it is removed then.
_STALE: dict[str, str] = {}

_NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+\.\d+)(?![\d,]*\.?\d)")


def section(heading: str) -> str:
  """BENCHMARKS.md from the line that starts with `heading` to the next such heading."""
  start = re.search(rf"^{re.escape(heading)}", _BENCHMARKS, flags=re.M).start()
  level = heading.split(" ")[0]
  following = re.compile(rf"^#{{1,{len(level)}}} ", flags=re.M)
  end = following.search(_BENCHMARKS, start + len(heading))
  return _BENCHMARKS[start:end.start() if end else len(_BENCHMARKS)]


def numbers(text: str) -> set[str]:
  return set(_NUMBER.findall(text))


def units(markdown: str) -> list[str]:
  """Paragraphs and table rows, outside fenced code blocks."""
  prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
  found = []
  for paragraph in re.split(r"\n\s*\n", prose):
    lines = paragraph.strip().splitlines()
    if lines and all(line.startswith("|") for line in lines):
      found.extend(lines)
    else:
      found.append(paragraph)
  return found


def disagreements(markdown: str) -> list[str]:
  """`number (command)` for each quoted number missing from its command's section."""
  wrong = []
  for unit in units(markdown):
    commands = [c for c in _SOURCES if re.search(c, unit)]
    if not commands:
      continue
    source = numbers("".join(section(_SOURCES[c]) for c in commands))
    wrong.extend(f"{n} ({', '.join(commands)}) in: {unit.strip()[:120]}"
                 for n in sorted(numbers(unit) - source))
  return wrong


_PAGES = ["README.md", "BENCHMARKS.md",
          *(str(p.relative_to(_REPO)) for p in sorted((_REPO / "docs").glob("*.md")))]


@pytest.mark.parametrize("page", [
    pytest.param(page, marks=pytest.mark.xfail(strict=True, reason=_STALE[page]))
    if page in _STALE else page for page in _PAGES])
def test_quoted_numbers_agree_with_benchmarks(page):
  assert not disagreements((_REPO / page).read_text())


def test_every_source_section_exists_and_holds_numbers():
  for heading in _SOURCES.values():
    assert len(numbers(section(heading))) > 10, heading


def test_the_readme_quotes_checked_numbers():
  checked = [u for u in units((_REPO / "README.md").read_text())
             if any(re.search(c, u) for c in _SOURCES) and numbers(u)]
  assert len(checked) >= 3, checked


def test_a_stale_copy_is_caught():
  table = section(_SOURCES[r"benchmarks\.train_step(?!_)"])
  assert "7,473" in table and "6,589" not in table
  stale = "`python -m benchmarks.train_step --repeats=15`: 6,589 vs 6,003 examples/s"
  assert disagreements(stale) == [
      f"6,589 (benchmarks\\.train_step(?!_)) in: {stale}"]
  assert not disagreements(stale.replace("6,589", "7,473"))
