"""jaxbn.linen / jaxbn.nnx BatchNorm swapped into flax models vs flax's own BatchNorm.

Flax's BatchNorm runs with use_fast_variance=False (its accurate variance), so
both sides should agree to float32 rounding: variables (names, shapes, values
from the same rng), outputs, gradients and updated running statistics.
"""

import functools

from flax import linen as nn
from flax import nnx
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from tests import helpers
from training import hlo

MOMENTUM = 0.8


pytestmark = pytest.mark.usefixtures("classic_threefry")


def _random_affine_init(key, shape, dtype=jnp.float32):
  """Random scale/bias, so the test sees whether params get flax's rng draws."""
  return 1.0 + 0.5 * jax.random.uniform(key, shape, dtype, minval=-1.0)


_data = functools.partial(helpers.normal, loc=1.5, scale=2.0)


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
  """Same tree structure, shapes and dtypes, and values close (chex)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- flax.linen


class LinenCNN(nn.Module):
  """conv -> BN -> relu -> dense, with the BatchNorm class as a field."""
  norm: type
  axis: int | tuple[int, ...] = -1
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = nn.Conv(4, (3, 3), kernel_init=nn.initializers.variance_scaling(
        1.0, "fan_in", "uniform"))(x)
    x = self.norm(use_running_average=not train, momentum=MOMENTUM,
                  use_fast_variance=False, axis=self.axis, axis_name=self.axis_name,
                  scale_init=_random_affine_init, bias_init=_random_affine_init)(
                      x, mask=mask)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(3, kernel_init=nn.initializers.variance_scaling(
        1.0, "fan_in", "uniform"))(x)


def _linen_models(**kwargs):
  return (LinenCNN(nn.BatchNorm, **kwargs), LinenCNN(jaxbn_linen.BatchNorm, **kwargs))


def _linen_train_step(model, variables, x, mask=None):
  """Loss, grads w.r.t. params, new batch_stats and output of one training step."""
  def loss_fn(params):
    out, updates = model.apply({**variables, "params": params}, x, train=True, mask=mask,
                               mutable=["batch_stats"])
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), (
        out, updates["batch_stats"])
  (loss, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  return loss, grads, stats, out


def _check_linen_model_pair(x, mask=None, steps=2, **model_kwargs):
  flax_model, jaxbn_model = _linen_models(**model_kwargs)
  key = jax.random.key(0)
  flax_vars = flax_model.init(key, x, train=True, mask=mask)
  jaxbn_vars = jaxbn_model.init(key, x, train=True, mask=mask)
  # Same names, shapes, dtypes and values: checkpoints are interchangeable.
  _assert_trees_close(jaxbn_vars, flax_vars, rtol=0, atol=0)

  variables = flax_vars
  flax_step = jax.jit(functools.partial(_linen_train_step, flax_model))
  jaxbn_step = jax.jit(functools.partial(_linen_train_step, jaxbn_model))
  for step in range(steps):
    batch = x * (1 + 0.1 * step)
    expected = flax_step(variables, batch, mask)
    actual = jaxbn_step(variables, batch, mask)
    _assert_trees_close(actual, expected, rtol=2e-5, atol=2e-5)
    variables = {**variables, "batch_stats": expected[2]}

  # Inference with the trained statistics.
  expected = flax_model.apply(variables, x, train=False)
  actual = jaxbn_model.apply(variables, x, train=False)
  _assert_trees_close(actual, expected)
  return variables


def test_linen_cnn_matches_flax_training_and_eval():
  variables = _check_linen_model_pair(_data((4, 6, 6, 2)))
  # The running statistics moved away from their initial values.
  assert np.all(np.abs(variables["batch_stats"]["BatchNorm_0"]["mean"]) > 1e-3)


def test_linen_tuple_axis_matches_flax():
  variables = _check_linen_model_pair(_data((4, 5, 6, 2), seed=1), steps=1,
                                      axis=(-2, -1))
  assert variables["batch_stats"]["BatchNorm_0"]["mean"].shape == (6, 4)


def test_linen_mask_matches_flax():
  x = _data((4, 6, 6, 2), seed=2)
  mask = np.random.default_rng(3).random((4, 6, 6, 1)) < 0.6
  _check_linen_model_pair(x, mask=jnp.asarray(mask), steps=1)


def test_linen_under_vmap_axis_name_matches_flax():
  x = _data((2, 3, 6, 6, 2), seed=4)  # 2 replicas x 3 examples
  flax_model, jaxbn_model = _linen_models(axis_name="batch")
  variables = flax_model.init(jax.random.key(0), x[0], train=True)

  def step(model, variables):
    def loss_fn(params):
      def replica(x_local):
        out, updates = model.apply({**variables, "params": params}, x_local,
                                   train=True, mutable=["batch_stats"])
        return out, updates["batch_stats"]
      out, stats = jax.vmap(replica, axis_name="batch")(x)
      return jnp.sum(out * out), (out, stats)
    return jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])

  expected = jax.jit(functools.partial(step, flax_model))(variables)
  actual = jax.jit(functools.partial(step, jaxbn_model))(variables)
  _assert_trees_close(actual, expected, rtol=2e-5, atol=2e-5)
  # Statistics are pooled over both replicas: every replica stores the same.
  stats = actual[0][1][1]["BatchNorm_0"]["mean"]
  np.testing.assert_array_equal(stats[0], stats[1])


def test_linen_shard_map_pools_count_weighted_masked_statistics(mesh8):
  """8 devices, uneven valid counts per device: statistics of the valid elements.

  (flax.linen.BatchNorm averages per-device masked means unweighted here,
  flax#2417, so the reference is NumPy on the concatenated valid elements.)
  """
  rng = np.random.default_rng(5)
  x = rng.normal(3.0, 2.0, (16, 3)).astype(np.float32)
  mask = np.zeros((16, 1), bool)
  mask[[0, 1, 2, 4, 7, 9, 10, 11, 12, 15]] = True
  model = jaxbn_linen.BatchNorm(use_running_average=False, momentum=MOMENTUM,
                                axis_name="data")
  variables = model.init(jax.random.key(0), x)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh8,
                     in_specs=(jax.P(), jax.P("data"), jax.P("data")),
                     out_specs=(jax.P("data"), jax.P()))
  def apply(variables, x, mask):
    y, updates = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  sharded = jax.sharding.NamedSharding(mesh8, jax.P("data"))
  y, stats = apply(variables, jax.device_put(x, sharded), jax.device_put(mask, sharded))
  valid = x[mask[:, 0]].astype(np.float64)
  mean, var = valid.mean(0), valid.var(0)
  np.testing.assert_allclose(stats["mean"], (1 - MOMENTUM) * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-5)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_linen_jit_over_batch_sharded_input_equals_unsharded(mesh8):
  x = _data((16, 3), seed=7)
  bn = jaxbn_linen.BatchNorm(use_running_average=False, momentum=MOMENTUM)
  variables = bn.init(jax.random.key(0), x)
  apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  expected = apply(variables, x)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh8, jax.P("data")))
  with jax.set_mesh(mesh8):
    actual = apply(variables, sharded)
  _assert_trees_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_linen_is_accurate_from_the_first_step_at_mean_3000():
  """Large mean, small std: flax's default fast variance fails here; jaxbn must not."""
  x = _data((256, 4), seed=6, loc=3000.0, scale=1.0)
  bn = jaxbn_linen.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  for step in range(2):  # fresh state, then a running mean far from the data's
    y, updates = bn.apply(variables, x + step, mutable=["batch_stats"])
    np.testing.assert_allclose(jnp.std(y, axis=0), 1.0, atol=1e-3)
    variables = {**variables, **updates}


def test_linen_redoes_the_sums_only_when_the_running_mean_is_far():
  """A running mean far from the data: the variance is still exact."""
  x = _data((256, 4), seed=8, loc=3000.0, scale=1.0)
  bn = jaxbn_linen.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  reference = np.asarray(x, np.float64)
  reference = (reference - reference.mean(0)) / np.sqrt(reference.var(0) + 1e-5)
  apply = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  for offset in (0.0, 2990.0, 2999.0):  # 3000, 10 and 1 std from the batch mean
    stats = {"mean": jnp.full((4,), offset), "var": jnp.ones((4,))}
    y, _ = apply({**variables, "batch_stats": stats}, x)
    np.testing.assert_allclose(y, reference, atol=2e-3)


def test_linen_steady_state_reads_x_as_often_as_the_core():
  """No extra pass for the shift: the adapter's step compiles to the core's passes."""
  x = _data((16, 8, 8, 8))
  bn = jaxbn_linen.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  params, state = jaxbn.init(8)
  state = state._replace(count=jnp.ones((), jnp.int32))  # the core's steady state

  def passes(loss, *args):
    text = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile().as_text()
    return hlo.array_passes(text, x.size)

  def adapter_loss(params, x):
    y, _ = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(y * y)

  def core_loss(params, x):
    return jnp.sum(jaxbn.batch_norm(params, state, x, training=True)[0] ** 2)

  adapter = passes(adapter_loss, variables["params"], x)
  assert adapter == passes(core_loss, params, x), adapter
  assert adapter[0] <= 3, adapter  # sums, normalize, backward


def test_linen_init_behaviour_matches_flax():
  x = _data((1, 3))
  for use_running_average in (False, True):
    # One example per feature: flax initializes anyway, and so does jaxbn.
    flax_bn = nn.BatchNorm(use_running_average=use_running_average, axis_name="unbound")
    jaxbn_bn = jaxbn_linen.BatchNorm(use_running_average=use_running_average,
                                     axis_name="unbound")
    expected, flax_vars = flax_bn.init_with_output(jax.random.key(0), x)
    actual, jaxbn_vars = jaxbn_bn.init_with_output(jax.random.key(0), x)
    _assert_trees_close((actual, jaxbn_vars), (expected, flax_vars))


def test_linen_dtypes_match_flax():
  x = _data((8, 3)).astype(jnp.bfloat16)
  for kwargs in ({}, {"dtype": jnp.bfloat16},
                 {"param_dtype": jnp.bfloat16, "force_float32_reductions": False}):
    flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False, **kwargs)
    jaxbn_bn = jaxbn_linen.BatchNorm(use_running_average=False, **kwargs)
    variables = flax_bn.init(jax.random.key(0), x)
    assert jax.tree.map(lambda v: v.dtype, jaxbn_bn.init(jax.random.key(0), x)) == (
        jax.tree.map(lambda v: v.dtype, variables)), kwargs
    expected, expected_stats = flax_bn.apply(variables, x, mutable=["batch_stats"])
    actual, actual_stats = jaxbn_bn.apply(variables, x, mutable=["batch_stats"])
    assert actual.dtype == expected.dtype, kwargs
    np.testing.assert_allclose(actual.astype(jnp.float32), expected.astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)
    _assert_trees_close(actual_stats, expected_stats, rtol=1e-2, atol=1e-2)


def test_linen_no_scale_no_bias_and_errors():
  x = _data((8, 4))
  for use_scale, use_bias in ((False, True), (True, False), (False, False)):
    kwargs = dict(use_running_average=False, use_scale=use_scale, use_bias=use_bias,
                  use_fast_variance=False)
    variables = nn.BatchNorm(**kwargs).init(jax.random.key(0), x)
    expected = nn.BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
    actual = jaxbn_linen.BatchNorm(**kwargs).apply(variables, x, mutable=["batch_stats"])
    _assert_trees_close(actual, expected)

  bn = jaxbn_linen.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  with pytest.raises(Exception, match="batch_stats"):  # flax's immutable-collection error
    bn.apply(variables, x)
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn_linen.BatchNorm().apply(variables, x)
  with pytest.raises(TypeError, match="momentum"):
    jaxbn_linen.BatchNorm(use_running_average=False, momentum=None).apply(
        variables, x, mutable=["batch_stats"])
  # One example per feature trains like flax (variance 0: the output is bias);
  # tests/jaxbn/test_flax_workflows.py compares the flax workflows that do it.
  y, _ = bn.apply(variables, x[:1], mutable=["batch_stats"])
  np.testing.assert_array_equal(y, 0.0)


# ------------------------------------------------------------------- flax.nnx


class NnxCNN(nnx.Module):
  """conv -> BN -> relu -> linear, with the BatchNorm class as an argument."""

  def __init__(self, norm, *, rngs, axis_name=None):
    uniform = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")
    self.conv = nnx.Conv(2, 4, (3, 3), kernel_init=uniform, rngs=rngs)
    self.norm = norm(4, momentum=MOMENTUM, use_fast_variance=False,
                     axis_name=axis_name, scale_init=_random_affine_init,
                     bias_init=_random_affine_init, rngs=rngs)
    self.linear = nnx.Linear(6 * 6 * 4, 3, kernel_init=uniform, rngs=rngs)

  def __call__(self, x, mask=None):
    x = nnx.relu(self.norm(self.conv(x), mask=mask))
    return self.linear(x.reshape((x.shape[0], -1)))


@nnx.jit
def _nnx_train_step(model, x, mask=None):
  """The idiomatic nnx step: Param grads; BatchStat updates land in `model`."""
  def loss_fn(model):
    out = model(x, mask=mask)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
  (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, out, grads


def _check_nnx_model_pair(x, mask=None, steps=2):
  flax_model = NnxCNN(nnx.BatchNorm, rngs=nnx.Rngs(0))
  jaxbn_model = NnxCNN(jaxbn_nnx.BatchNorm, rngs=nnx.Rngs(0))
  _assert_trees_close(nnx.to_pure_dict(nnx.state(jaxbn_model)),
                      nnx.to_pure_dict(nnx.state(flax_model)), rtol=0, atol=0)
  for step in range(steps):
    batch = x * (1 + 0.1 * step)
    results = []
    for model in (flax_model, jaxbn_model):
      loss, out, grads = _nnx_train_step(model, batch, mask)
      results.append((loss, out, nnx.to_pure_dict(grads),
                      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
    _assert_trees_close(results[1], results[0], rtol=2e-5, atol=2e-5)
    # Continue both from flax's statistics, so differences do not compound.
    nnx.update(jaxbn_model, nnx.state(flax_model, nnx.BatchStat))
  flax_model.eval()
  jaxbn_model.eval()
  _assert_trees_close(jaxbn_model(x), flax_model(x))
  return jaxbn_model


def test_nnx_cnn_matches_flax_training_and_eval():
  model = _check_nnx_model_pair(_data((4, 6, 6, 2)))
  assert model.norm.use_running_average is True  # model.eval() reached the adapter
  model.train()
  assert model.norm.use_running_average is False
  view = nnx.view(model, use_running_average=True)
  assert view.norm.use_running_average is True


def test_nnx_mask_matches_flax():
  mask = jnp.asarray(np.random.default_rng(3).random((4, 6, 6, 1)) < 0.6)
  _check_nnx_model_pair(_data((4, 6, 6, 2), seed=2), mask=mask, steps=1)


def test_nnx_tuple_axis_against_numpy_and_flax_eval():
  # flax.nnx.BatchNorm keeps (num_features,) statistics but cannot update them
  # for a tuple axis (it adds (W, C) to (W * C,)); jaxbn's adapter can.
  x = _data((5, 3, 4, 2), seed=1)
  bn = jaxbn_nnx.BatchNorm(8, axis=(-2, -1), momentum=MOMENTUM, rngs=nnx.Rngs(0))
  y = bn(x)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean((0, 1)), x64.var((0, 1))
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  assert bn.mean[...].shape == (8,)
  np.testing.assert_allclose(bn.mean[...], (1 - MOMENTUM) * mean.reshape(-1), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], MOMENTUM + (1 - MOMENTUM) * var.reshape(-1),
                             rtol=1e-5)
  flax_bn = nnx.BatchNorm(8, axis=(-2, -1), use_running_average=True, rngs=nnx.Rngs(0))
  nnx.update(flax_bn, nnx.state(bn, nnx.BatchStat))
  bn.eval()
  np.testing.assert_allclose(bn(x), flax_bn(x), rtol=1e-5, atol=1e-5)


def test_nnx_under_vmap_axis_name_matches_flax():
  x = _data((2, 3, 6, 6, 2), seed=4)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    model = NnxCNN(norm, rngs=nnx.Rngs(0), axis_name="batch")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, graphdef=graphdef):
      def replica(params, rest, x_local):
        model = nnx.merge(graphdef, params, rest)
        out = model(x_local)
        return out, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      out, stats = jax.vmap(replica, in_axes=(None, None, 0), axis_name="batch")(
          params, rest, x)
      return jnp.sum(out * out), (out, stats)

    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, rest)
    results.append((loss, aux, nnx.to_pure_dict(grads)))
  _assert_trees_close(results[1], results[0], rtol=2e-5, atol=2e-5)


def test_nnx_dtype_and_errors():
  x = _data((8, 3)).astype(jnp.bfloat16)
  for kwargs in ({}, {"dtype": jnp.bfloat16}):
    flax_bn = nnx.BatchNorm(3, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    jaxbn_bn = jaxbn_nnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs)
    expected, actual = flax_bn(x), jaxbn_bn(x)
    assert actual.dtype == expected.dtype, kwargs
    np.testing.assert_allclose(actual.astype(jnp.float32), expected.astype(jnp.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(jaxbn_bn.var[...], flax_bn.var[...], rtol=1e-2)

  for use_scale, use_bias in ((False, True), (True, False)):
    kwargs = dict(use_scale=use_scale, use_bias=use_bias, rngs=nnx.Rngs(0))
    flax_bn = nnx.BatchNorm(3, use_fast_variance=False, **kwargs)
    jaxbn_bn = jaxbn_nnx.BatchNorm(3, **kwargs)
    assert jaxbn_bn.scale is None if not use_scale else jaxbn_bn.bias is None
    np.testing.assert_allclose(jaxbn_bn(x.astype(jnp.float32)),
                               flax_bn(x.astype(jnp.float32)), rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match="num_features=4"):
    jaxbn_nnx.BatchNorm(4, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn_nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
  for num_features in (0, "3", 2.7, (2, 3)):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
      jaxbn_nnx.BatchNorm(num_features, rngs=nnx.Rngs(0))


def test_adapters_are_reachable_from_the_package():
  assert jaxbn.linen.BatchNorm is jaxbn_linen.BatchNorm
  assert jaxbn.nnx.BatchNorm is jaxbn_nnx.BatchNorm
  # Swapping the import keeps linen's auto-generated module names.
  model = LinenCNN(jaxbn.linen.BatchNorm)
  names = model.init(jax.random.key(0), _data((2, 6, 6, 2)), train=False)["params"]
  assert set(names) == {"Conv_0", "BatchNorm_0", "Dense_0"}
