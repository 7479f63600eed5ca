"""docs/api.md documents every public name of jaxbn (mkdocs builds it in CI)."""

import pathlib
import re

import jaxbn

_API = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def test_api_reference_lists_every_public_name():
  documented = set(re.findall(r"^::: jaxbn\.(\w+)", _API, flags=re.M))
  assert documented == set(jaxbn.__all__), (
      f"missing from docs/api.md: {sorted(set(jaxbn.__all__) - documented)}; "
      f"not public: {sorted(documented - set(jaxbn.__all__))}")
