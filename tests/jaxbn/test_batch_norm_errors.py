"""Bad input fails at trace time with an error that names the argument."""

import jax
import jax.numpy as jnp
import pytest

import jaxbn


@pytest.fixture
def setup():
  params, state = jaxbn.init(3)
  return params, state, jnp.ones((4, 3))


def _call(setup, **kwargs):
  params, state, x = setup
  x = kwargs.pop("x", x)
  params = kwargs.pop("params", params)
  state = kwargs.pop("state", state)
  kwargs.setdefault("training", True)
  return jaxbn.batch_norm(params, state, x, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=jnp.ones((4, 3), jnp.int32)), TypeError, "x must have a floating-point dtype"),
    (dict(axis=2), ValueError, r"axis=2 is out of range for an input of rank 2"),
    (dict(axis=(0, -2)), ValueError, "names the same axis more than once"),
    (dict(axis=1.5), TypeError, "axis must be an int or a tuple of ints"),
    (dict(x=jnp.ones((4, 5))), ValueError,
     r"params.scale has shape \(3,\), but x of shape \(4, 5\).*needs shape \(5,\)"),
    (dict(params=None, state=jaxbn.init(2)[1]), ValueError,
     r"state.mean has shape \(2,\)"),
    (dict(epsilon=0.0), ValueError, "epsilon must be > 0"),
    (dict(epsilon=-1e-5), ValueError, "epsilon must be > 0"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(x=jnp.ones((1, 3))), ValueError, "more than one value per feature"),
    (dict(mask=jnp.ones((5, 3), bool)), ValueError, "mask of shape .* is not broadcastable"),
    (dict(mask=jnp.ones((4, 3))), TypeError, "mask must be a boolean array"),
    (dict(training="yes"), TypeError, "training must be a bool"),
    (dict(axis_name="data", axis_index_groups=[[0, 1], [2]]), ValueError,
     "axis_index_groups must be non-empty groups of equal size"),
    (dict(axis_name="data", axis_index_groups=[[0, 1], [1, 2]]), ValueError,
     "every replica index"),
    (dict(axis_index_groups=[[0]]), ValueError, "axis_index_groups needs axis_name"),
])
def test_bad_arguments(setup, kwargs, error, match):
  with pytest.raises(error, match=match):
    _call(setup, **kwargs)


def test_errors_are_raised_at_trace_time(setup):
  params, state, _ = setup
  f = jax.jit(lambda x: jaxbn.batch_norm(params, state, x, training=True, axis=3))
  with pytest.raises(ValueError, match="axis=3 is out of range"):
    f.lower(jax.ShapeDtypeStruct((4, 3), jnp.float32))


def test_traced_training_flag_is_rejected(setup):
  params, state, x = setup
  with pytest.raises(TypeError, match="training must be a Python bool known at trace time"):
    jax.jit(lambda t: jaxbn.batch_norm(params, state, x, training=t))(True)


def test_one_value_per_feature_is_rejected_globally_under_vmap(setup):
  params, state, _ = setup
  with pytest.raises(ValueError, match="more than one value per feature"):
    jax.vmap(lambda xi: jaxbn.batch_norm(params, state, xi, training=True, axis_name="b"),
             axis_name="b")(jnp.ones((1, 3)))


@pytest.mark.parametrize("num_features", [0, -2, (3, 0), "3", "34", 2.7, (2.7,), True])
def test_init_rejects_bad_feature_counts(num_features):
  # One validation for every function that takes num_features.
  for init in (jaxbn.init, jaxbn.scaling.init_standardize, jaxbn.scaling.init_min_max):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
      init(num_features)


def test_init_rejects_integer_dtype():
  with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
    jaxbn.init(3, dtype=jnp.int32)
