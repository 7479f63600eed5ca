"""Frozen batch norm (pytorch#66073): fixed running statistics, trainable affine.

In jaxbn's functional API this is `training=False` while differentiating:
the running statistics are constants, so gradients reach scale and bias (and
x, through the fixed affine map) and the state comes back unchanged.
"""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import jaxbn
from training import hlo

EPSILON = 1e-5


def _setup(shape=(8, 4, 4, 3), seed=0):
  rng = np.random.default_rng(seed)
  features = shape[-1]
  params = jaxbn.BatchNormParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
      bias=jnp.asarray(rng.normal(size=features), jnp.float32))
  state = jaxbn.BatchNormState(
      mean=jnp.asarray(rng.normal(1.0, 1.0, features), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 3.0, features), jnp.float32),
      count=jnp.array(1000, jnp.int32))
  x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
  target = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return params, state, x, target


def _loss(params, state, x, target):
  y, new_state = jaxbn.batch_norm(params, state, x, training=False)
  return jnp.mean((y - target) ** 2), new_state


def test_gradients_reach_scale_and_bias_and_match_numpy():
  params, state, x, target = _setup()
  (_, new_state), (grads, dx) = jax.jit(jax.value_and_grad(
      _loss, (0, 2), has_aux=True))(params, state, x, target)
  # Reference: y = scale * x_hat + bias with x_hat from the fixed statistics.
  x64, t64 = np.asarray(x, np.float64), np.asarray(target, np.float64)
  inv_std = 1 / np.sqrt(np.asarray(state.var, np.float64) + EPSILON)
  x_hat = (x64 - np.asarray(state.mean, np.float64)) * inv_std
  scale = np.asarray(params.scale, np.float64)
  dy = 2 * (scale * x_hat + np.asarray(params.bias, np.float64) - t64) / x64.size
  np.testing.assert_allclose(grads.scale, (dy * x_hat).sum((0, 1, 2)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads.bias, dy.sum((0, 1, 2)), rtol=1e-5, atol=1e-7)
  # No batch-statistics terms in dx: the normalization is a fixed affine map.
  np.testing.assert_allclose(dx, dy * scale * inv_std, rtol=1e-5, atol=1e-8)
  assert np.all(np.abs(grads.scale) > 0) and np.all(np.abs(grads.bias) > 0)
  chex.assert_trees_all_equal(new_state, state)


def test_fine_tuning_steps_train_affine_and_keep_statistics():
  params, state, x, target = _setup()
  optimizer = optax.sgd(0.1)

  @jax.jit
  def step(params, opt_state, state):
    (loss, state), grads = jax.value_and_grad(_loss, has_aux=True)(params, state, x, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  opt_state = optimizer.init(params)
  frozen, losses = state, []
  for _ in range(5):
    params, opt_state, frozen, loss = step(params, opt_state, frozen)
    losses.append(float(loss))
  chex.assert_trees_all_equal(frozen, state)
  assert losses[-1] < losses[0]


def test_frozen_under_jit_over_sharded_batch_needs_no_statistics_traffic(mesh8):
  """Fixed statistics: the forward has no collective; only parameter gradients
  are summed across devices."""
  params, state, x, target = _setup((16, 4, 4, 3))
  want = jax.value_and_grad(_loss, has_aux=True)(params, state, x, target)
  sharded = NamedSharding(mesh8, P("data"))
  xs, ts = jax.device_put(x, sharded), jax.device_put(target, sharded)
  forward = jax.jit(lambda p, s, x: jaxbn.batch_norm(p, s, x, training=False)[0])
  assert hlo.count_collectives(forward.lower(params, state, xs).compile().as_text()).total == 0
  got = jax.jit(jax.value_and_grad(_loss, has_aux=True))(params, state, xs, ts)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got, want)


def test_frozen_under_shard_map(mesh8):
  params, state, x, target = _setup((16, 4, 4, 3))
  (_, _), want = jax.value_and_grad(_loss, has_aux=True)(params, state, x, target)

  def per_device(params, x, target):
    # Each device's mean over its slice; the global loss is their mean.
    grads, new_state = jax.grad(_loss, has_aux=True)(params, state, x, target)
    return jax.tree.map(lambda g: g / 8, grads), new_state

  step = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                               in_specs=(P(), P("data"), P("data")),
                               out_specs=(P(), P())))
  sharded = NamedSharding(mesh8, P("data"))
  grads, new_state = step(params, jax.device_put(x, sharded),
                          jax.device_put(target, sharded))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, want)
  chex.assert_trees_all_equal(new_state, state)
