"""jaxbn.batch_renorm (Ioffe, 2017) against a NumPy reference, batch_norm and autodiff."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
import numpy as np
import optax
import pytest

import jaxbn
from tests import helpers

EPSILON = 1e-3


def _setup(shape=(16, 5), seed=0):
  """Params, a trained-looking state and an input of `shape` (mean 2, std 3).

  With 5 features, the running statistics make r = sigma_B / sigma about
  3, 1, 1.2, 0.5, 0.9 and d about 0, -1, -0.2, 0.3, -2.3: some clip at
  r_max=1.5 / d_max=0.5, some do not.
  """
  rng = np.random.default_rng(seed)
  features = shape[-1]
  params = jaxbn.BatchNormParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
      bias=jnp.asarray(rng.normal(size=features), jnp.float32))
  state = jaxbn.BatchNormState(
      mean=jnp.asarray(np.resize([2.0, 5.0, 2.5, 0.0, 10.0], features), jnp.float32),
      var=jnp.asarray(np.resize([1.0, 9.0, 6.0, 36.0, 12.0], features), jnp.float32),
      count=jnp.array(10_000, jnp.int32))
  x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
  return params, state, x


def _reference(params, state, x, r_max, d_max, momentum=0.9):
  """Float64 NumPy batch renorm over axis 0..-2: (y, r, d, new_mean, new_var)."""
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  mu_b, var_b = x.mean(0), x.var(0)
  sigma_b = np.sqrt(var_b + EPSILON)
  sigma = np.sqrt(np.asarray(state.var, np.float64) + EPSILON)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - np.asarray(state.mean, np.float64)) / sigma, -d_max, d_max)
  x_hat = (x - mu_b) / sigma_b
  y = np.asarray(params.scale) * (x_hat * r + d) + np.asarray(params.bias)
  new_mean = momentum * np.asarray(state.mean) + (1 - momentum) * mu_b
  new_var = momentum * np.asarray(state.var) + (1 - momentum) * var_b
  return y, r, d, new_mean, new_var


class RMax1DMax0Test(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_batch_norm_exactly(self):
    """r = 1 and d = 0 exactly, so the same operations run: bitwise equal eagerly.

    Under jit XLA may fuse the two programs' reductions differently, which can
    change the last bit of the statistics; agreement is then to rounding.
    """
    params, state, x = _setup((8, 3, 3, 4))
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    @self.variant
    def run(params, x):
      renorm = helpers.outputs_and_grads(
          lambda p, x: jaxbn.batch_renorm(p, state, x, training=True, r_max=1, d_max=0,
                                          epsilon=EPSILON), params, x, cotangent)
      norm = helpers.outputs_and_grads(
          lambda p, x: jaxbn.batch_norm(p, state, x, training=True, epsilon=EPSILON),
          params, x, cotangent)
      return renorm, norm

    got, want = run(params, x)
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    else:
      chex.assert_trees_all_equal(got, want)


def test_forward_and_state_match_numpy_with_partial_clipping():
  params, state, x = _setup()
  y, new_state = jax.jit(lambda p, s, x: jaxbn.batch_renorm(
      p, s, x, training=True, r_max=1.5, d_max=0.5, momentum=0.9, epsilon=EPSILON))(
          params, state, x)
  y_ref, r, d, new_mean, new_var = _reference(params, state, x, 1.5, 0.5)
  # The fixture exercises both regimes of both corrections.
  assert np.any(np.isclose(r, 1.5) | np.isclose(r, 1 / 1.5)) and np.any(
      (r < 1.5) & (r > 1 / 1.5))
  assert np.any(np.abs(d) == 0.5) and np.any(np.abs(d) < 0.5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, new_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, new_var, rtol=1e-5)
  assert new_state.count == 10_001


def test_unclipped_training_output_equals_inference_output():
  """The point of renorm: with inactive clips, training computes (x - mu) / sigma."""
  params, state, x = _setup()
  y_train, _ = jax.jit(lambda p, s, x: jaxbn.batch_renorm(
      p, s, x, training=True, r_max=np.inf, d_max=np.inf, epsilon=EPSILON))(params, state, x)
  y_infer, same_state = jaxbn.batch_renorm(params, state, x, training=False,
                                           r_max=np.inf, d_max=np.inf, epsilon=EPSILON)
  np.testing.assert_allclose(y_train, y_infer, rtol=1e-5, atol=1e-5)
  assert same_state is state


def test_gradients_hold_r_and_d_constant():
  """dx, dscale, dbias equal the closed form with r and d treated as constants."""
  params, state, x = _setup()
  cotangent = np.random.default_rng(4).normal(size=x.shape)
  grads, dx = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxbn.batch_renorm(
      p, state, x, training=True, r_max=1.5, d_max=0.5, epsilon=EPSILON)[0]
      * cotangent), (0, 1)))(params, x)
  _, r, d, _, _ = _reference(params, state, x, 1.5, 0.5)
  x64 = np.asarray(x, np.float64)
  mu_b, sigma_b = x64.mean(0), np.sqrt(x64.var(0) + EPSILON)
  x_hat = (x64 - mu_b) / sigma_b
  gamma = np.asarray(params.scale, np.float64)
  dx_ref = gamma * r / sigma_b * (cotangent - cotangent.mean(0)
                                  - x_hat * (cotangent * x_hat).mean(0))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads.scale, (cotangent * (x_hat * r + d)).sum(0),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads.bias, cotangent.sum(0), rtol=1e-5, atol=1e-5)


def test_check_grads_where_both_corrections_are_clipped():
  """Clipped r and d are locally constant, so finite differences apply exactly."""
  params, state, x = _setup((12, 3))
  state = state._replace(mean=jnp.full(3, -10.0), var=jnp.full(3, 100.0))
  weights = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def loss(params, x):
    return jnp.sum(jnp.sin(jaxbn.batch_renorm(
        params, state, x, training=True, r_max=1.2, d_max=0.3)[0]) * weights)

  _, r, d, _, _ = _reference(params, state, x, 1.2, 0.3)
  assert np.all(np.isclose(r, 1 / 1.2)) and np.all(d == 0.3)
  check_grads(jax.jit(loss), (params, x), order=2, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_schedules_are_callables_of_the_step_count():
  """The paper's warm-up: r_max 1 -> 3 and d_max 0 -> 5 as optax schedules."""
  params, state, x = _setup()
  r_max = optax.linear_schedule(1.0, 3.0, transition_steps=35_000, transition_begin=5_000)
  d_max = optax.linear_schedule(0.0, 5.0, transition_steps=20_000, transition_begin=5_000)
  step = jax.jit(lambda p, s, x: jaxbn.batch_renorm(
      p, s, x, training=True, r_max=r_max, d_max=d_max, epsilon=EPSILON))
  # Step 5000: schedules at their start, which is batch norm.
  early = state._replace(count=jnp.array(5_000, jnp.int32))
  y_start, _ = step(params, early, x)
  y_bn, _ = jaxbn.batch_norm(params, early, x, training=True, epsilon=EPSILON)
  np.testing.assert_allclose(y_start, y_bn, rtol=1e-6, atol=1e-6)
  # Step 40000: schedules at their end, the fixed bounds (same compilation).
  late = state._replace(count=jnp.array(40_000, jnp.int32))
  y_late, _ = step(params, late, x)
  y_fixed, _ = _reference(params, late, x, 3.0, 5.0)[:2]
  np.testing.assert_allclose(y_late, y_fixed, rtol=1e-5, atol=1e-5)


def test_params_none_and_mask():
  params, state, x = _setup()
  mask = jnp.arange(16)[:, None] < 11   # the last 5 examples do not count
  y, new_state = jaxbn.batch_renorm(None, state, x, training=True, r_max=1.5, d_max=0.5,
                                    momentum=0.9, epsilon=EPSILON, mask=mask)
  identity = jaxbn.BatchNormParams(jnp.ones(5), jnp.zeros(5))
  y_ref, r, d, new_mean, new_var = _reference(identity, state, x[:11], 1.5, 0.5)
  x64 = np.asarray(x, np.float64)
  mu_b, sigma_b = x64[:11].mean(0), np.sqrt(x64[:11].var(0) + EPSILON)
  np.testing.assert_allclose(y, (x64 - mu_b) / sigma_b * r + d,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[:11], y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, new_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, new_var, rtol=1e-5)


def _global_reference(params, state, x, cotangent, **kwargs):
  return helpers.outputs_and_grads(
      lambda p, x: jaxbn.batch_renorm(p, state, x, training=True, r_max=1.5, d_max=0.5,
                                      **kwargs), params, x, cotangent)


def test_shard_map_with_axis_name_equals_global_batch(mesh8):
  params, state, x = _setup((32, 2, 5))
  cotangent = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
  want = _global_reference(params, state, x, cotangent)

  def per_device(params, x, cotangent):
    return _global_reference(params, state, x, cotangent, axis_name="data")

  step = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                               in_specs=(P(), P("data"), P("data")),
                               out_specs=(P("data"), P(), (P(), P("data")))))
  sharded = NamedSharding(mesh8, P("data"))
  got = step(params, jax.device_put(x, sharded), jax.device_put(cotangent, sharded))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_shard_map_without_axis_name_is_per_device_renorm(mesh8):
  """Per-device statistics; replicated params get gradients summed over devices."""
  params, state, x = _setup((32, 5))

  def loss(params, x):
    y, _ = jaxbn.batch_renorm(params, state, x, training=True, r_max=1.5, d_max=0.5)
    return jnp.sum(y ** 3)

  grads = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh8, in_specs=(P(), P("data")),
                                out_specs=P()))(
      params, jax.device_put(x, NamedSharding(mesh8, P("data"))))
  per_device = [jax.grad(loss)(params, chunk) for chunk in jnp.split(x, 8)]
  chex.assert_trees_all_close(grads, jax.tree.map(lambda *g: sum(g), *per_device),
                              rtol=1e-4, atol=1e-3)


def test_bfloat16_input_keeps_float32_statistics():
  params, state, x = _setup()
  y, new_state = jaxbn.batch_renorm(params, state, x.astype(jnp.bfloat16), training=True,
                                    r_max=1.5, d_max=0.5, momentum=0.9, epsilon=EPSILON)
  assert y.dtype == jnp.bfloat16 and new_state.var.dtype == jnp.float32
  y_ref, _, _, new_mean, _ = _reference(params, state, x.astype(jnp.bfloat16), 1.5, 0.5)
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(new_state.mean, new_mean, rtol=1e-5, atol=1e-5)


def test_jit_over_batch_sharded_array_equals_global_batch(mesh8):
  params, state, x = _setup((32, 5))
  cotangent = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
  want = _global_reference(params, state, x, cotangent)
  sharded = NamedSharding(mesh8, P("data"))
  got = jax.jit(_global_reference)(params, state, jax.device_put(x, sharded),
                                   jax.device_put(cotangent, sharded))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_vmap_with_axis_name_equals_global_batch():
  params, state, x = _setup((12, 5))
  cotangent = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)
  want = _global_reference(params, state, x, cotangent)
  per_example = jax.vmap(
      lambda p, xi: jaxbn.batch_renorm(p, state, xi, training=True, r_max=1.5,
                                       d_max=0.5, axis_name="batch"),
      in_axes=(None, 0), out_axes=(0, None), axis_name="batch")
  def loss(params, x):
    y, new_state = per_example(params, x)
    return jnp.sum(y * cotangent), (y, new_state)
  (_, (y, new_state)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      params, x)
  chex.assert_trees_all_close((y, new_state, grads), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bound,value,error,match", [
    ("r_max", 0.5, ValueError, r"r_max must be >= 1"),
    ("r_max", float("nan"), ValueError, r"r_max must be >= 1"),
    ("d_max", -0.1, ValueError, r"d_max must be >= 0"),
    ("r_max", "3", TypeError, r"r_max must be a number or a callable"),
    ("d_max", True, TypeError, r"d_max must be a number or a callable"),
    ("r_max", np.ones(2), ValueError, r"r_max must be a scalar"),
    ("r_max", lambda count: jnp.ones(3), ValueError, r"r_max\(count\) must return a scalar"),
    ("d_max", lambda count: count > 3, TypeError, r"d_max\(count\) must return a real"),
])
def test_bad_bounds_raise(bound, value, error, match):
  params, state, x = _setup()
  kwargs = dict(r_max=2.0, d_max=1.0)
  kwargs[bound] = value
  with pytest.raises(error, match=match):
    jaxbn.batch_renorm(params, state, x, training=True, **kwargs)


def test_traced_bound_and_traced_training_raise_type_error():
  params, state, x = _setup()
  with pytest.raises(TypeError, match=r"r_max must be a Python number or a callable"):
    jax.jit(lambda r: jaxbn.batch_renorm(params, state, x, training=True, r_max=r,
                                         d_max=1.0))(2.0)
  with pytest.raises(TypeError, match=r"training must be a Python bool"):
    jax.jit(lambda t: jaxbn.batch_renorm(params, state, x, training=t, r_max=2.0,
                                         d_max=1.0))(True)


def test_batch_norm_argument_errors_carry_over():
  params, state, x = _setup()
  with pytest.raises(ValueError, match=r"state.mean has shape \(5,\)"):
    jaxbn.batch_renorm(None, state, x[:, :4], training=True, r_max=2.0, d_max=1.0)
  with pytest.raises(ValueError, match=r"more than one value per feature"):
    jaxbn.batch_renorm(params, state, x[:1], training=True, r_max=2.0, d_max=1.0)
  with pytest.raises(TypeError, match=r"x must have a floating-point dtype"):
    jaxbn.batch_renorm(params, state, x.astype(jnp.int32), training=True, r_max=2.0,
                       d_max=1.0)
  with pytest.raises(NameError):
    jaxbn.batch_renorm(params, state, x, training=True, r_max=2.0, d_max=1.0,
                       axis_name="unbound")
