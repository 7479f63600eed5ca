"""The Examples sections of jaxbn's public docstrings run as doctests and print what they show."""

import doctest

import pytest

import jaxbn

# The core functions, which must keep an Examples section.
_WITH_EXAMPLES = ("init", "batch_norm", "moments", "merge_moments",
                  "scaling.fit_standardize", "scaling.standardize", "scaling.fit_min_max",
                  "scaling.min_max_scale")


def _doctests():
  finder = doctest.DocTestFinder(recurse=False)
  tests = {}
  public = [(name, getattr(jaxbn, name)) for name in jaxbn.__all__ if name != "scaling"]
  public += [(f"scaling.{name}", getattr(jaxbn.scaling, name))
             for name in jaxbn.scaling.__all__]
  for name, obj in public:
    for test in finder.find(obj, f"jaxbn.{name}", globs={}):
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
