"""docs/api.md documents every public name of jaxbn (mkdocs builds it in CI)."""

import pathlib
import re
import subprocess
import sys

import pytest

import jaxbn

_API = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
_SUBMODULES = ("scaling",)


def test_api_reference_lists_every_public_name():
  documented = set(re.findall(r"^::: (jaxbn\.[\w.]+)", _API, flags=re.M))
  public = {f"jaxbn.{name}" for name in jaxbn.__all__ if name not in _SUBMODULES}
  public |= {f"jaxbn.scaling.{name}" for name in jaxbn.scaling.__all__}
  public |= {"jaxbn.linen.BatchNorm", "jaxbn.linen.recompute_stats",
             "jaxbn.linen.sync_stats", "jaxbn.nnx.BatchNorm", "jaxbn.nnx.recompute_stats",
             "jaxbn.nnx.sync_stats"}
  assert documented >= public, f"missing from docs/api.md: {sorted(public - documented)}"
  for name in documented - public:
    module, _, attribute = name.rpartition(".")
    assert module in ("jaxbn.linen", "jaxbn.nnx", "jaxbn.equinox"), f"not public: {name}"
    assert attribute and not attribute.startswith("_"), f"not public: {name}"


def test_star_import_is_light_and_complete():
  code = ("import sys; from jaxbn import *; "
          "assert 'flax' not in sys.modules, 'from jaxbn import * imported flax'; "
          "assert callable(batch_norm) and callable(scaling.fit_standardize)")
  subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu"})


def test_feature_scaling_names_moved_with_a_warning():
  with pytest.warns(DeprecationWarning, match="jaxbn.scaling.fit_standardize"):
    fit = jaxbn.fit_standardize
  assert fit is jaxbn.scaling.fit_standardize
  with pytest.raises(AttributeError, match="no attribute 'fit_standardise'"):
    jaxbn.fit_standardise  # noqa: B018
