"""Single-device semantics of jaxbn.batch_norm against the notes' NumPy reference."""

import functools

from absl.testing import parameterized
import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import jaxbn
from tests import helpers
from tests.jaxbn import _reference

# (shape, axis, feature_axes after canonicalization)
LAYOUTS = [
    ((16, 5), -1, (1,)),
    ((4, 6, 6, 3), -1, (3,)),       # NHWC: per-channel over N x H x W
    ((4, 3, 5, 5), 1, (1,)),        # NCHW
    ((3, 4, 2, 5), (1, -1), (1, 3)),  # two feature axes
]


_random_params = helpers.random_params


_random_input = functools.partial(helpers.normal, seed=1, loc=1.5, scale=3.0)


class SameWithAndWithoutJitTest(chex.TestCase):
  """The core function's forward, state update and backward, eagerly and under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*LAYOUTS)
  def test_forward_and_state_update_match_numpy(self, shape, axis, feature_axes):
    feature_shape = tuple(shape[a] for a in feature_axes)
    params = _random_params(feature_shape)
    _, state = jaxbn.init(feature_shape)
    x = _random_input(shape)
    y, new_state = self.variant(lambda p, s, x: jaxbn.batch_norm(
        p, s, x, training=True, axis=axis, momentum=0.9, epsilon=1e-3))(params, state, x)
    y_ref, mu, var = _reference.forward(x, params.scale, params.bias, feature_axes, 1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state.mean, 0.1 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.var, 0.9 + 0.1 * var, rtol=1e-5)
    assert new_state.count == 1 and new_state.mean.dtype == jnp.float32

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*LAYOUTS)
  def test_backward_matches_seed_closed_form(self, shape, axis, feature_axes):
    feature_shape = tuple(shape[a] for a in feature_axes)
    params = _random_params(feature_shape)
    _, state = jaxbn.init(feature_shape)
    x = _random_input(shape)
    cotangent = _random_input(shape, seed=7, loc=0.0, scale=1.0)

    def loss(params, x):
      y, _ = jaxbn.batch_norm(params, state, x, training=True, axis=axis)
      return jnp.sum(y * cotangent)

    grads, dx = self.variant(jax.grad(loss, (0, 1)))(params, x)
    dx_ref, dgamma_ref, dbeta_ref = _reference.backward(cotangent, x, params.scale,
                                                        feature_axes, 1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.scale, dgamma_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads.bias, dbeta_ref, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mean_3000_std_1_is_exact_on_the_first_and_later_steps(self):
    """flax's E[x^2]-E[x]^2 gives per-feature std between 0.5 and 322 here."""
    x = helpers.normal((256, 16), loc=3000.0)
    params, state = jaxbn.init(16)
    step = self.variant(lambda s, x: jaxbn.batch_norm(params, s, x, training=True))
    y, state = step(state, x)
    np.testing.assert_allclose(np.std(np.asarray(y, np.float64), 0), 1.0, atol=1e-3)
    # Later steps shift by the debiased running mean.
    y2, _ = step(state, x + 5.0)
    np.testing.assert_allclose(np.std(np.asarray(y2, np.float64), 0), 1.0, atol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_constant_feature_and_nonfinite_input_never_reach_state(self):
    params, state = jaxbn.init(3)
    x = jnp.stack([jnp.full(8, 5.0), jnp.arange(8.0), jnp.arange(8.0)], axis=1)
    step = self.variant(lambda s, x: jaxbn.batch_norm(params, s, x, training=True))
    y, new_state = step(state, x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(new_state.var))
    np.testing.assert_allclose(y[:, 0], 0.0)
    _, bad_state = step(new_state, x.at[0, 2].set(jnp.nan))
    assert np.all(np.isfinite(bad_state.mean)) and np.all(np.isfinite(bad_state.var))
    np.testing.assert_array_equal(bad_state.mean[2], new_state.mean[2])


def _plain_batch_norm(params, x, epsilon=1e-5):
  """Textbook two-pass forward with autodiff: the custom_vjp must agree with it."""
  mean = jnp.mean(x, 0, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), 0, keepdims=True)
  return params.scale[None] * (x - mean) * lax.rsqrt(var + epsilon) + params.bias[None]


def test_custom_vjp_equals_autodiff_of_plain_forward():
  params = _random_params((6,))
  _, state = jaxbn.init(6)
  x = _random_input((12, 6))
  weights = _random_input((12, 6), seed=3)

  def jaxbn_loss(p, x):
    return jnp.sum(jnp.tanh(jaxbn.batch_norm(p, state, x, training=True)[0]) * weights)

  def plain_loss(p, x):
    return jnp.sum(jnp.tanh(_plain_batch_norm(p, x)) * weights)

  got = jax.grad(jaxbn_loss, (0, 1))(params, x)
  want = jax.grad(plain_loss, (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
  # Second order (gradient penalties): Hessian-vector products agree too.
  direction = _random_input((12, 6), seed=4)
  hvp = lambda f: jax.jvp(jax.grad(lambda x: f(params, x)), (x,), (direction,))[1]
  np.testing.assert_allclose(hvp(jaxbn_loss), hvp(plain_loss), rtol=1e-3, atol=1e-4)


def test_check_grads_first_and_second_order():
  params = _random_params((3,))
  _, state = jaxbn.init(3)
  x = _random_input((6, 3))
  weights = _random_input((6, 3), seed=5)

  def loss(p, x):
    return jnp.sum(jnp.sin(jaxbn.batch_norm(p, state, x, training=True)[0]) * weights)

  check_grads(loss, (params, x), order=2, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_inference_uses_running_stats_and_returns_state_unchanged():
  params = _random_params((4,))
  state = jaxbn.BatchNormState(mean=jnp.array([1., -2., 0.5, 3.]),
                               var=jnp.array([4., 0.25, 1., 9.]),
                               count=jnp.array(7, jnp.int32))
  x = _random_input((5, 4))
  y, new_state = jaxbn.batch_norm(params, state, x, training=False, epsilon=1e-3)
  want = (np.asarray(params.scale) * (np.asarray(x) - np.asarray(state.mean))
          / np.sqrt(np.asarray(state.var) + 1e-3) + np.asarray(params.bias))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert new_state is state


def test_frozen_batch_norm_trains_affine_only():
  """Fine-tuning with fixed statistics is training=False (pytorch#66073)."""
  params = _random_params((4,))
  state = jaxbn.BatchNormState(jnp.ones(4), 2 * jnp.ones(4), jnp.array(3, jnp.int32))
  x = _random_input((5, 4))
  grads, new_state = jax.grad(
      lambda p: (lambda y, s: (jnp.sum(y ** 2), s))(
          *jaxbn.batch_norm(p, state, x, training=False)), has_aux=True)(params)
  assert np.all(np.abs(grads.scale) > 0) and np.all(np.abs(grads.bias) > 0)
  chex.assert_trees_all_equal(new_state, state)


def test_momentum_none_is_cumulative_average():
  _, state = jaxbn.init(3)
  batches = [_random_input((8, 3), seed=s) for s in range(4)]
  step = jax.jit(lambda s, x: jaxbn.batch_norm(None, s, x, training=True, momentum=None)[1])
  for x in batches:
    state = step(state, x)
  means = [np.mean(np.asarray(x), 0) for x in batches]
  variances = [np.var(np.asarray(x), 0) for x in batches]
  np.testing.assert_allclose(state.mean, np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(state.var, np.mean(variances, 0), rtol=1e-5)
  assert state.count == 4


def test_unbiased_running_var_stores_n_over_n_minus_1():
  _, state = jaxbn.init(2)
  x = _random_input((4, 3, 3, 2))
  _, new_state = jaxbn.batch_norm(None, state, x, training=True, momentum=0.0,
                                  unbiased_running_var=True)
  np.testing.assert_allclose(new_state.var, np.var(np.asarray(x), (0, 1, 2), ddof=1),
                             rtol=1e-5)


def test_params_none_is_plain_standardization():
  _, state = jaxbn.init(3)
  x = _random_input((10, 3))
  y, _ = jaxbn.batch_norm(None, state, x, training=True)
  y_ref, _, _ = _reference.forward(x, np.ones(3), np.zeros(3), (1,), 1e-5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(None, state, x, training=True)[0] ** 3))(x)
  dx_ref, _, _ = _reference.backward(3 * y_ref ** 2, x, np.ones(3), (1,), 1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)


def test_flax_fast_variance_fails_where_jaxbn_is_exact():
  """The case above is a real failure of the default flax BatchNorm (it can fail)."""
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(0).normal(3000.0, 1.0, (256, 16)), jnp.float32)
  model = nn.BatchNorm(use_running_average=False)
  variables = model.init(jax.random.key(0), x)
  y, _ = model.apply(variables, x, mutable=["batch_stats"])
  assert np.max(np.abs(np.std(np.asarray(y, np.float64), 0) - 1.0)) > 0.1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_input_keeps_float32_statistics(dtype):
  """haiku#396: bf16 input with mean 50 gives output std ~320 when stats are bf16."""
  x = jnp.asarray(np.random.default_rng(0).normal(50.0, 1.0, (512, 8)), dtype)
  params, state = jaxbn.init(8)
  y, new_state = jax.jit(lambda s, x: jaxbn.batch_norm(params, s, x, training=True))(state, x)
  assert y.dtype == dtype and new_state.mean.dtype == jnp.float32
  reference = np.asarray(x, np.float64)
  reference = (reference - reference.mean(0)) / np.sqrt(reference.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float64), reference, atol=3e-2)
  np.testing.assert_allclose(new_state.mean, 0.01 * np.asarray(x, np.float64).mean(0),
                             rtol=1e-5)
  dx = jax.grad(lambda x: jnp.sum(
      jaxbn.batch_norm(params, state, x, training=True)[0].astype(jnp.float32) ** 2))(x)
  assert dx.dtype == dtype and np.all(np.isfinite(np.asarray(dx, np.float32)))


def test_mask_counts_only_valid_elements():
  params = _random_params((3,))
  _, state = jaxbn.init(3)
  x = _random_input((10, 3))
  mask = jnp.arange(10)[:, None] < jnp.array([[10, 6, 3]])
  y, new_state = jaxbn.batch_norm(params, state, x, training=True, mask=mask, momentum=0.0)
  for f, n in enumerate([10, 6, 3]):
    valid = np.asarray(x[:n, f], np.float64)
    want = (np.asarray(x[:, f]) - valid.mean()) / np.sqrt(valid.var() + 1e-5)
    np.testing.assert_allclose(y[:, f], params.scale[f] * want + params.bias[f],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new_state.mean[f], valid.mean(), rtol=1e-5, atol=1e-6)
  # The gradient of a masked BN equals autodiff of the masked plain forward.
  def plain(p, x):
    m = mask.astype(jnp.float32)
    n = jnp.sum(m, 0, keepdims=True)
    mean = jnp.sum(m * x, 0, keepdims=True) / n
    var = jnp.sum(m * jnp.square(x - mean), 0, keepdims=True) / n
    return p.scale[None] * (x - mean) * lax.rsqrt(var + 1e-5) + p.bias[None]
  weights = _random_input((10, 3), seed=9)
  got = jax.grad(lambda p, x: jnp.sum(jaxbn.batch_norm(
      p, state, x, training=True, mask=mask)[0] * weights), (0, 1))(params, x)
  want = jax.grad(lambda p, x: jnp.sum(plain(p, x) * weights), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_fully_masked_feature_keeps_its_running_statistics():
  params, state = jaxbn.init(2)
  x = _random_input((6, 2))
  mask = jnp.array([[True, False]] * 6)
  y, new_state = jaxbn.batch_norm(params, state, x, training=True, mask=mask)
  assert np.all(np.isfinite(y))
  assert new_state.mean[1] == state.mean[1] and new_state.var[1] == state.var[1]


def test_params_and_state_are_ordinary_pytrees():
  import optax
  params, state = jaxbn.init((2, 3), dtype=jnp.bfloat16)
  assert params.scale.shape == (2, 3) and params.scale.dtype == jnp.bfloat16
  assert state.var.dtype == jnp.float32 and state.count.dtype == jnp.int32
  assert len(jax.tree.leaves((params, state))) == 5
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  assert isinstance(optax.apply_updates(params, updates), jaxbn.BatchNormParams)
