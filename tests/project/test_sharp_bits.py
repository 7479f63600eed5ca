"""Each common mistake on docs/sharp-bits.md gives the message that the page shows.

The page's "Five common mistakes" section holds, per mistake, a ```py block (the
mistake) and a ```text block (what jaxbn says). This test runs each block and compares
the exception or warning it gives, as `Type: message`, with the page's text, so the
page and the messages cannot drift apart.
"""

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import jaxbn

_PAGE = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "sharp-bits.md").read_text()
_SECTION = _PAGE.split("## Five common mistakes")[1].split("\n## ")[0]
_MISTAKES = {
    title: re.search(r"```py\n(.*?)```.*?```text\n(.*?)```", body, flags=re.S).groups()
    for title, body in re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", _SECTION,
                                  flags=re.S | re.M)}


def what_jaxbn_says(source: str) -> str:
  """`Type: message` of the exception, or else of the first warning, `source` gives."""
  namespace = {"jax": jax, "jnp": jnp, "jaxbn": jaxbn}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      exec(compile(source, "<sharp-bits>", "exec"), namespace)
    except Exception as e:  # noqa: BLE001 - any exception is the message under test
      return f"{type(e).__name__}: {e}"
  assert caught, "the mistake gave neither an error nor a warning"
  return f"{caught[0].category.__name__}: {caught[0].message}"


def test_the_page_lists_five_mistakes():
  assert len(_MISTAKES) == 5, sorted(_MISTAKES)


@pytest.mark.parametrize("title", sorted(_MISTAKES))
def test_mistake_gives_the_message_on_the_page(title):
  source, shown = _MISTAKES[title]
  assert " ".join(what_jaxbn_says(source).split()) == " ".join(shown.split())


def test_momentum_warning_points_at_the_callers_line_once():
  params, state = jaxbn.init(4)
  step = jax.jit(lambda s, x: jaxbn.batch_norm(params, s, x, training=True, momentum=0.1))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    for _ in range(3):
      state = step(state, jnp.ones((8, 4)))[1]
    step(state, jnp.ones((16, 4)))  # a second trace, same line: not repeated
  assert [w.category for w in caught] == [jaxbn.MomentumWarning]
  assert caught[0].filename == __file__


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, None])
def test_deliberate_momenta_do_not_warn(momentum):
  params, state = jaxbn.init(4)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jaxbn.MomentumWarning)
    jaxbn.batch_norm(params, state, jnp.ones((8, 4)), training=True, momentum=momentum)


def test_the_flax_module_warns_at_the_model_line():
  nn = pytest.importorskip("flax.linen")

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.1)(x)

  x = jnp.ones((8, 4))
  variables = Model().init(jax.random.key(0), x)
  with pytest.warns(jaxbn.MomentumWarning) as caught:
    Model().apply(variables, x, mutable=["batch_stats"])
  assert caught[0].filename == __file__


def test_channels_first_hint_only_when_axis_1_fits():
  params, state = jaxbn.init(16)
  with pytest.raises(ValueError, match="pass axis=1") as nchw:
    jaxbn.batch_norm(params, state, jnp.ones((8, 16, 5, 5)), training=True)
  with pytest.raises(ValueError) as other:
    jaxbn.batch_norm(params, state, jnp.ones((8, 7, 5, 5)), training=True)
  assert "NCHW" in str(nchw.value) and "NCHW" not in str(other.value)
  y, _ = jaxbn.batch_norm(params, state, jnp.ones((8, 16, 5, 5)), training=True, axis=1)
  assert y.shape == (8, 16, 5, 5)


def test_bound_axis_names_pass_the_check():
  params, state = jaxbn.init(4)
  f = lambda x: jaxbn.batch_norm(params, state, x, training=True, axis_name="batch")[0]
  assert jax.vmap(f, axis_name="batch")(jnp.ones((2, 8, 4))).shape == (2, 8, 4)
  with pytest.raises(NameError, match="leave axis_name=None"):
    jax.jit(f)(jnp.ones((8, 4)))
