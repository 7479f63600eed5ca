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
