"""`import jaxbn` needs only jax and numpy (the core's dependencies in pyproject.toml)."""

import subprocess
import sys

_OPTIONAL = ("flax", "optax", "chex", "torch", "tensorflow", "orbax", "haiku", "equinox")


def _imported_after(code: str) -> set[str]:
  script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True).stdout
  return {name.split(".")[0] for name in out.split()}


def test_import_jaxbn_and_a_batch_norm_call_load_no_optional_dependency():
  loaded = _imported_after(
      "import jax.numpy as jnp\nimport jaxbn\n"
      "params, state = jaxbn.init(3)\n"
      "y, _ = jaxbn.batch_norm(params, state, jnp.ones((4, 3)), training=True)\n"
      "y.block_until_ready()")
  assert not loaded & set(_OPTIONAL), sorted(loaded & set(_OPTIONAL))


def test_flax_adapters_load_flax_on_first_use():
  # The check above can fail: touching jaxbn.linen must pull flax in.
  assert "flax" in _imported_after("import jaxbn\njaxbn.linen")


def test_core_requires_only_jax_jaxlib_and_numpy():
  # What `pip install jaxbn` installs (the extras add the rest). Verified by
  # hand in a fresh venv: `pip install .` gives jax, jaxlib, numpy (+ their
  # own dependencies) and a working `jaxbn.batch_norm`.
  from importlib import metadata

  from packaging.requirements import Requirement
  requirements = [Requirement(text) for text in metadata.requires("jaxbn") or []]
  core = {r.name.lower() for r in requirements if r.marker is None}
  assert core == {"jax", "jaxlib", "numpy"}, core
  extras = {str(r.marker) for r in requirements if r.marker is not None}
  assert {f'extra == "{name}"' for name in ("flax", "torch", "train", "dev")} <= extras
