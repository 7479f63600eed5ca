"""jaxbn.recompute_stats (PreciseBN): population statistics of every layer's input."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import jaxbn

EPSILON = 1e-5


def _model_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "bn_in": jaxbn.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
                                     jnp.asarray(rng.normal(size=3), jnp.float32)),
      "w1": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
      "bn_hidden": jaxbn.BatchNormParams(jnp.ones(6), jnp.full(6, 0.1)),
      "w2": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "bn_out": jaxbn.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32),
                                      jnp.zeros(4)),
  }


def _model_state():
  """A nested state: jaxbn states among other leaves, at arbitrary depths."""
  _, s3 = jaxbn.init(3)
  _, s6 = jaxbn.init(6)
  _, s4 = jaxbn.init(4)
  # Stale running statistics, as after training with momentum.
  s6 = s6._replace(mean=jnp.full(6, 5.0), count=jnp.array(100, jnp.int32))
  return {"blocks": [s3, s6], "head": {"bn": s4, "steps_seen": jnp.array(7)}}


def _apply(params, state, x, *, axis_name=None):
  """Three BN layers in training mode: x -> BN -> W1 -> tanh -> BN -> W2 -> BN."""
  s3, s6 = state["blocks"]
  h, s3 = jaxbn.batch_norm(params["bn_in"], s3, x, training=True, axis_name=axis_name)
  h = jnp.tanh(h @ params["w1"])
  h, s6 = jaxbn.batch_norm(params["bn_hidden"], s6, h, training=True, momentum=0.9,
                           axis_name=axis_name)
  h = h @ params["w2"]
  h, s4 = jaxbn.batch_norm(params["bn_out"], state["head"]["bn"], h, training=True,
                           axis_name=axis_name)
  return h, {"blocks": [s3, s6], "head": {"bn": s4, "steps_seen": state["head"]["steps_seen"]}}


def _numpy_layer_inputs(params, x):
  """Float64: the input of each BN layer for one batch, in training mode."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def bn(layer, h):
    mean, var = h.mean(0), h.var(0)
    return p[layer].scale * (h - mean) / np.sqrt(var + EPSILON) + p[layer].bias

  x = np.asarray(x, np.float64)
  hidden = np.tanh(bn("bn_in", x) @ p["w1"])
  out_in = bn("bn_hidden", hidden) @ p["w2"]
  return [x, hidden, out_in]


def _batches(num=5, batch_size=16, seed=1):
  rng = np.random.default_rng(seed)
  # Batch-to-batch shifts, so the variance of the batch means matters.
  return [jnp.asarray(rng.normal(rng.normal(0, 2), 3.0, (batch_size, 3)), jnp.float32)
          for _ in range(num)]


def _assert_population_statistics(new_state, params, batches):
  per_batch = [_numpy_layer_inputs(params, b) for b in batches]
  layers = [new_state["blocks"][0], new_state["blocks"][1], new_state["head"]["bn"]]
  for index, layer in enumerate(layers):
    inputs = np.concatenate([inputs[index] for inputs in per_batch])
    np.testing.assert_allclose(layer.mean, inputs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.var, inputs.var(0), rtol=1e-4, atol=1e-5)


def test_each_layer_gets_the_population_statistics_of_its_input():
  params, state, batches = _model_params(), _model_state(), _batches()
  new_state = jaxbn.recompute_stats(_apply, params, state, batches)
  _assert_population_statistics(new_state, params, batches)
  # Only mean and var change: counts and other state leaves are kept.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert type(new_state["blocks"][1]) is jaxbn.BatchNormState
  assert new_state["blocks"][1].count == 100
  assert new_state["head"]["steps_seen"] is state["head"]["steps_seen"]


def test_pooling_is_mean_of_variances_plus_variance_of_means():
  """The definition, checked on the first layer whose input is the data itself."""
  params, state = _model_params(), _model_state()
  batches = _batches(num=4, batch_size=6, seed=2)
  first = jaxbn.recompute_stats(_apply, params, state, batches)["blocks"][0]
  x = np.stack([np.asarray(b, np.float64) for b in batches])   # (batch, example, feature)
  means, variances = x.mean(1), x.var(1)
  np.testing.assert_allclose(first.mean, means.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first.var, variances.mean(0) + means.var(0), rtol=1e-5)


def test_num_batches_takes_a_prefix_of_an_endless_iterator():
  params, state, batches = _model_params(), _model_state(), _batches(num=3)
  endless = (batches[i % 3] for i in range(10**9))
  new_state = jaxbn.recompute_stats(_apply, params, state, endless, num_batches=3)
  _assert_population_statistics(new_state, params, batches)


def test_jitted_apply_fn_and_batch_sharded_data(mesh8):
  """A pre-jitted model retraces for the probes; sharded batches give global statistics."""
  params, state, batches = _model_params(), _model_state(), _batches()
  sharded = [jax.device_put(b, NamedSharding(mesh8, P("data"))) for b in batches]
  new_state = jaxbn.recompute_stats(jax.jit(_apply), params, state, sharded)
  _assert_population_statistics(new_state, params, batches)


def test_shard_map_model_with_axis_name(mesh8):
  params, state, batches = _model_params(), _model_state(), _batches()
  apply_sharded = jax.shard_map(
      functools.partial(_apply, axis_name="data"), mesh=mesh8,
      in_specs=(P(), P(), P("data")), out_specs=(P("data"), P()))
  sharded = [jax.device_put(b, NamedSharding(mesh8, P("data"))) for b in batches]
  new_state = jaxbn.recompute_stats(apply_sharded, params, state, sharded)
  _assert_population_statistics(new_state, params, batches)


def test_vmap_model_with_axis_name():
  params, state, batches = _model_params(), _model_state(), _batches(num=3)
  per_example = jax.vmap(lambda p, s, xi: _apply(p, s, xi, axis_name="batch"),
                         in_axes=(None, None, 0), out_axes=(0, None), axis_name="batch")
  new_state = jaxbn.recompute_stats(per_example, params, state, batches)
  _assert_population_statistics(new_state, params, batches)


def test_renorm_and_ghost_layers_and_unbiased_variance():
  """The update rule of each layer decides what a batch records; pooling is the same."""
  _, state = jaxbn.init(3)
  state = {"renorm": state._replace(mean=jnp.ones(3), count=jnp.array(50, jnp.int32)),
           "ghost": state, "unbiased": state}

  def apply(params, state, x):
    h, renorm = jaxbn.batch_renorm(None, state["renorm"], x, training=True, r_max=2.0,
                                   d_max=1.0)
    g, ghost = jaxbn.ghost_batch_norm(None, state["ghost"], x, training=True,
                                      virtual_batch_size=4)
    u, unbiased = jaxbn.batch_norm(None, state["unbiased"], x, training=True,
                                   unbiased_running_var=True)
    return h + g + u, {"renorm": renorm, "ghost": ghost, "unbiased": unbiased}

  batches = _batches(num=3, batch_size=8, seed=3)
  new_state = jaxbn.recompute_stats(apply, None, state, batches)
  x = np.concatenate([np.asarray(b, np.float64) for b in batches])
  for name in ("renorm", "ghost"):
    np.testing.assert_allclose(new_state[name].mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state[name].var, x.var(0), rtol=1e-5)
  # Each batch's variance is n/(n-1)-corrected before pooling.
  means = np.stack([np.asarray(b, np.float64).mean(0) for b in batches])
  variances = np.stack([np.asarray(b, np.float64).var(0, ddof=1) for b in batches])
  np.testing.assert_allclose(new_state["unbiased"].var,
                             variances.mean(0) + means.var(0), rtol=1e-5)


def test_non_finite_batch_statistics_keep_the_old_values():
  _, state = jaxbn.init(2)
  state = state._replace(mean=jnp.array([0.5, 0.5]), var=jnp.array([2.0, 2.0]))
  batches = [jnp.ones((4, 2)).at[0, 1].set(jnp.inf), 2 * jnp.ones((4, 2))]
  apply = lambda p, s, x: jaxbn.batch_norm(None, s, x, training=True)
  new_state = jaxbn.recompute_stats(apply, None, state, batches)
  np.testing.assert_allclose(new_state.mean, [1.5, 0.5])
  np.testing.assert_allclose(new_state.var, [0.25, 2.0])


def test_bad_usage_raises():
  params, state, batches = _model_params(), _model_state(), _batches(num=2)
  with pytest.raises(ValueError, match=r"state holds no jaxbn.BatchNormState"):
    jaxbn.recompute_stats(_apply, params, {"w": jnp.ones(3)}, batches)
  with pytest.raises(ValueError, match=r"needs 3 batches, got 2"):
    jaxbn.recompute_stats(_apply, params, state, batches, num_batches=3)
  with pytest.raises(ValueError, match=r"needs at least one batches, got 0"):
    jaxbn.recompute_stats(_apply, params, state, [])
  for bad in (0, 2.0, True):
    with pytest.raises(TypeError, match=r"num_batches must be a positive int or None"):
      jaxbn.recompute_stats(_apply, params, state, batches, num_batches=bad)

  def rebuilds_state(params, state, x):
    y, new_state = _apply(params, state, x)
    new_state["head"]["bn"] = jaxbn.BatchNormState(*new_state["head"]["bn"])
    return y, new_state
  with pytest.raises(ValueError, match=r"apply_fn returned at state\['head'\]\['bn'\] is "
                                       r"not the one jaxbn returned"):
    jaxbn.recompute_stats(rebuilds_state, params, state, batches)

  def drops_a_layer(params, state, x):
    y, new_state = _apply(params, state, x)
    del new_state["head"]
    return y, new_state
  with pytest.raises(ValueError, match=r"structured like the state it was given"):
    jaxbn.recompute_stats(drops_a_layer, params, state, batches)

  def inference_mode(params, state, x):
    h, s = jaxbn.batch_norm(None, state, x, training=False)
    return h, s
  with pytest.raises(ValueError, match=r"layer of state ran \[0\] times in training mode"):
    jaxbn.recompute_stats(inference_mode, None, jaxbn.init(3)[1], batches)

  def shared_layer_twice(params, state, x):
    h, s = jaxbn.batch_norm(None, state, x, training=True)
    return jaxbn.batch_norm(None, s, h, training=True)
  with pytest.raises(ValueError, match=r"ran \[2\] times in training mode"):
    jaxbn.recompute_stats(shared_layer_twice, None, jaxbn.init(3)[1], batches)
