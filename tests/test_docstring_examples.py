"""The Examples sections of jaxbn's public docstrings run as doctests and print what they show."""

import doctest

import pytest

import jaxbn

# The core functions, which must keep an Examples section.
_WITH_EXAMPLES = ("init", "batch_norm", "moments", "merge_moments", "fit_standardize",
                  "standardize", "fit_min_max", "min_max_scale")


def _doctests():
  finder = doctest.DocTestFinder(recurse=False)
  tests = {}
  for name in jaxbn.__all__:
    if name in ("linen", "nnx"):  # the flax modules need the flax extra
      continue
    for test in finder.find(getattr(jaxbn, name), f"jaxbn.{name}", globs={}):
      if test.examples:
        tests[name] = test
  return tests


_TESTS = _doctests()


def test_core_functions_have_examples():
  missing = [name for name in _WITH_EXAMPLES if name not in _TESTS]
  assert not missing, f"no Examples section in: {missing}"


@pytest.mark.parametrize("name", sorted(_TESTS))
def test_docstring_examples_run(name):
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  report = []
  result = runner.run(_TESTS[name], out=report.append)
  assert result.failed == 0, "".join(report)
