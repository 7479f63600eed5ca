"""jaxbn.ghost_batch_norm against per-ghost-batch NumPy and batch_norm references."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import jaxbn
from tests.jaxbn import _reference
from training import hlo

EPSILON = 1e-3


def _setup(shape, seed=0):
  rng = np.random.default_rng(seed)
  features = shape[-1]
  params = jaxbn.BatchNormParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
      bias=jnp.asarray(rng.normal(size=features), jnp.float32))
  _, state = jaxbn.init(features)
  # Ghost batches with different means, so their statistics really differ.
  offsets = np.repeat(rng.normal(0, 2, (shape[0] // 2,) + (1,) * (len(shape) - 1)), 2, 0)
  x = jnp.asarray(rng.normal(1.5, 3.0, shape) + offsets, jnp.float32)
  return params, state, x


def _ghost_reference(params, x, virtual_batch_size):
  """Float64 NumPy: each contiguous ghost batch normalized on its own."""
  x = np.asarray(x, np.float64)
  chunks = np.split(x, x.shape[0] // virtual_batch_size)
  feature_axes = (x.ndim - 1,)
  return np.concatenate([
      _reference.forward(c, params.scale, params.bias, feature_axes, EPSILON)[0]
      for c in chunks])


@pytest.mark.parametrize("shape,virtual_batch_size", [((16, 5), 4), ((8, 3, 3, 2), 2)])
def test_forward_and_running_update_match_numpy(shape, virtual_batch_size):
  params, state, x = _setup(shape)
  y, new_state = jax.jit(lambda p, s, x: jaxbn.ghost_batch_norm(
      p, s, x, training=True, virtual_batch_size=virtual_batch_size, momentum=0.9,
      epsilon=EPSILON))(params, state, x)
  np.testing.assert_allclose(y, _ghost_reference(params, x, virtual_batch_size),
                             rtol=1e-5, atol=1e-5)
  # Running statistics: the whole batch's, pooled exactly from the ghost batches.
  x64 = np.asarray(x, np.float64).reshape(-1, shape[-1])
  np.testing.assert_allclose(new_state.mean, 0.1 * x64.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, 0.9 + 0.1 * x64.var(0), rtol=1e-5)
  assert new_state.count == 1
  # ... which is not the mean of the ghost variances (the variance of the ghost
  # means is part of the population variance).
  ghost = np.asarray(x, np.float64).reshape(
      (-1, virtual_batch_size * int(np.prod(shape[1:-1])), shape[-1]))
  assert np.all(ghost.var(1).mean(0) < 0.95 * x64.var(0))


def test_running_state_equals_batch_norm_on_the_same_batch():
  params, state, x = _setup((16, 5))
  ghost = jax.jit(lambda s: jaxbn.ghost_batch_norm(params, s, x, training=True,
                                                   virtual_batch_size=4)[1])
  batch_norm = jax.jit(lambda s: jaxbn.batch_norm(params, s, x, training=True)[1])
  for _ in range(3):  # also from a warm state (shift = running mean)
    ghost_state, bn_state = ghost(state), batch_norm(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 ghost_state, bn_state)
    state = bn_state


def test_virtual_batch_of_the_whole_batch_is_batch_norm():
  params, state, x = _setup((12, 5))
  got = jax.jit(lambda p, s, x: jaxbn.ghost_batch_norm(
      p, s, x, training=True, virtual_batch_size=12))(params, state, x)
  want = jax.jit(lambda p, s, x: jaxbn.batch_norm(p, s, x, training=True))(params, state, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               got, want)


def test_gradients_equal_batch_norm_per_ghost_batch():
  params, state, x = _setup((12, 4))
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def ghost_loss(params, x):
    y, _ = jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=3)
    return jnp.sum(y * cotangent)

  def chunked_loss(params, x):
    y = jnp.concatenate([jaxbn.batch_norm(params, state, chunk, training=True)[0]
                         for chunk in jnp.split(x, 4)])
    return jnp.sum(y * cotangent)

  got = jax.jit(jax.grad(ghost_loss, (0, 1)))(params, x)
  want = jax.jit(jax.grad(chunked_loss, (0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               got, want)


def test_batch_axis_and_nchw_features():
  """Sequence-major (T, N, C, L) input: batch_axis=1, feature axis 2."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(1.0, 2.0, (3, 8, 2, 4)), jnp.float32)
  params, state = jaxbn.init(2)
  y, new_state = jax.jit(lambda p, s, x: jaxbn.ghost_batch_norm(
      p, s, x, training=True, virtual_batch_size=4, batch_axis=1, axis=2,
      epsilon=EPSILON, momentum=0.0))(params, state, x)
  x64 = np.asarray(x, np.float64)
  for g in range(2):
    chunk = x64[:, 4 * g:4 * (g + 1)]
    mean = chunk.mean((0, 1, 3), keepdims=True)
    var = chunk.var((0, 1, 3), keepdims=True)
    np.testing.assert_allclose(y[:, 4 * g:4 * (g + 1)],
                               (chunk - mean) / np.sqrt(var + EPSILON),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_state.mean, x64.mean((0, 1, 3)), rtol=1e-5)
  np.testing.assert_allclose(new_state.var, x64.var((0, 1, 3)), rtol=1e-5)


def test_mask_counts_only_valid_examples_per_ghost_batch():
  params, state, x = _setup((8, 3))
  valid = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
  y, new_state = jax.jit(lambda p, s, x: jaxbn.ghost_batch_norm(
      p, s, x, training=True, virtual_batch_size=4, mask=valid[:, None], momentum=0.0,
      epsilon=EPSILON))(params, state, x)
  x64 = np.asarray(x, np.float64)
  for g in range(2):
    rows = slice(4 * g, 4 * (g + 1))
    chosen = x64[rows][valid[rows]]
    want = _reference.forward(chosen, params.scale, params.bias, (1,), EPSILON)[1:]
    normalized = ((x64[rows] - want[0]) / np.sqrt(want[1] + EPSILON)
                  * np.asarray(params.scale) + np.asarray(params.bias))
    np.testing.assert_allclose(y[rows], normalized, rtol=1e-5, atol=1e-5)
  # Count-weighted pooling: the running update sees the 5 valid examples.
  np.testing.assert_allclose(new_state.mean, x64[valid].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, x64[valid].var(0), rtol=1e-5)


def test_inference_ignores_ghost_batches():
  params, state, x = _setup((10, 5))
  state = state._replace(mean=jnp.ones(5), var=jnp.full(5, 4.0))
  got = jaxbn.ghost_batch_norm(params, state, x, training=False, virtual_batch_size=4)
  want = jaxbn.batch_norm(params, state, x, training=False)
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_jit_over_batch_sharded_array_needs_no_statistics_traffic(axis_type):
  """Ghost batches stay device-local: the forward's y needs no collective at all.

  The running-statistics update adds exactly two all-reduces of feature-sized
  vectors (the pooled mean, then the pooled second moment).
  """
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  params, state, x = _setup((32, 3, 3, 4))  # 4 examples per device, 2 ghost batches
  forward = lambda p, s, x: jaxbn.ghost_batch_norm(p, s, x, training=True,
                                                   virtual_batch_size=2)
  want = forward(params, state, x)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    y_only = jax.jit(lambda p, s, x: forward(p, s, x)[0]).lower(params, state, xs)
    with_state = jax.jit(forward).lower(params, state, xs)
    y_text = y_only.compile().as_text()
    state_text = with_state.compile().as_text()
    got = jax.jit(forward)(params, state, xs)
  assert hlo.count_collectives(y_text).total == 0
  assert hlo.count_collectives(state_text).total == 2
  payloads = [line for line in state_text.splitlines() if " all-reduce(" in line]
  assert all("f32[2,4]" in line or "f32[1,4]" in line for line in payloads), payloads
  assert got[0].sharding.spec[0] == "data"
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               got, want)


def test_shard_map_axis_name_pools_only_the_running_update(mesh8):
  params, state, x = _setup((32, 5))
  cotangent = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

  def loss(params, x, cotangent, **kwargs):
    y, new_state = jaxbn.ghost_batch_norm(params, state, x, training=True,
                                          virtual_batch_size=2, **kwargs)
    return jnp.sum(y * cotangent), (y, new_state)

  (_, want), want_grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      params, x, cotangent)

  def per_device(params, x, cotangent):
    (_, outputs), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        params, x, cotangent, axis_name="data")
    return outputs, grads

  step = jax.jit(jax.shard_map(per_device, mesh=mesh8,
                               in_specs=(P(), P("data"), P("data")),
                               out_specs=((P("data"), P()), (P(), P("data")))))
  sharded = NamedSharding(mesh8, P("data"))
  got, grads = step(params, jax.device_put(x, sharded), jax.device_put(cotangent, sharded))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               (got, grads), (want, want_grads))


def test_vmap_axis_name_over_replicas_equals_global_batch():
  params, state, x = _setup((12, 5))
  per_replica = jax.vmap(
      lambda xr: jaxbn.ghost_batch_norm(params, state, xr, training=True,
                                        virtual_batch_size=2, axis_name="replica"),
      out_axes=(0, None), axis_name="replica")
  y, new_state = jax.jit(per_replica)(x.reshape(3, 4, 5))
  want = jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               (y.reshape(12, 5), new_state), want)


def test_shard_map_without_axis_name_updates_from_local_examples(mesh8):
  params, state, x = _setup((16, 3))

  def loss(params, x):
    y, new_state = jaxbn.ghost_batch_norm(params, state, x, training=True,
                                          virtual_batch_size=2, momentum=0.0)
    return jnp.sum(y ** 3), new_state.mean[None]

  step = jax.jit(jax.shard_map(jax.grad(loss, has_aux=True), mesh=mesh8,
                               in_specs=(P(), P("data")), out_specs=(P(), P("data"))))
  grads, means = step(params, jax.device_put(x, NamedSharding(mesh8, P("data"))))
  np.testing.assert_allclose(means, np.asarray(x).reshape(8, 2, 3).mean(1),
                             rtol=1e-5, atol=1e-6)
  # Ghost batches never span devices: the gradient is the single-device one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grads, jax.grad(loss, has_aux=True)(params, x)[0])


def test_bad_arguments_raise():
  params, state, x = _setup((12, 5))
  with pytest.raises(ValueError, match=r"virtual_batch_size=5 must divide the batch "
                                       r"size 12 \(x.shape\[0\]"):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=5)
  with pytest.raises(ValueError, match=r"virtual_batch_size must be a positive int, got 0"):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=0)
  for bad in (True, 2.0, None):
    with pytest.raises(TypeError, match=r"virtual_batch_size must be a positive int"):
      jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=bad)
  with pytest.raises(ValueError, match=r"batch_axis=1 is also a feature axis"):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=2,
                           batch_axis=1)
  with pytest.raises(ValueError, match=r"batch_axis=2 is out of range"):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=2,
                           batch_axis=2)
  with pytest.raises(ValueError, match=r"more than one value per feature in each ghost"):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=1)
  with pytest.raises(TypeError, match=r"training must be a bool"):
    jaxbn.ghost_batch_norm(params, state, x, training=1, virtual_batch_size=2)
  with pytest.raises(NameError):
    jaxbn.ghost_batch_norm(params, state, x, training=True, virtual_batch_size=2,
                           axis_name="unbound")
  # Inference has no ghost batches: any batch size works.
  jaxbn.ghost_batch_norm(params, state, x, training=False, virtual_batch_size=5)


def test_ghost_batches_spanning_devices():
  """V larger than the per-device batch: Auto sharding stays correct (the
  compiler moves data); Explicit sharding raises instead of guessing a layout."""
  params, state, x = _setup((16, 3))   # 2 examples per device, V = 4
  forward = lambda p, s, x: jaxbn.ghost_batch_norm(p, s, x, training=True,
                                                   virtual_batch_size=4)
  want = forward(params, state, x)
  auto = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  got = jax.jit(forward)(params, state, jax.device_put(x, NamedSharding(auto, P("data"))))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               got, want)
  explicit = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(explicit):
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the "
                                         r"per-device batch 2 of x"):
      jax.jit(forward)(params, state, xs)
