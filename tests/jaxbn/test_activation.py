"""Batch norm fused with an activation, and its memory-saving (InPlace-ABN) backward."""

import functools

import chex
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _activation
from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from tests import helpers

SLOPE = 0.1
EPS = 1e-5


_data = functools.partial(helpers.normal, loc=1.0, scale=2.0)


def _params(features, seed=1):
  rng = np.random.default_rng(seed)
  # Scales of both signs, none near zero (see test_scale_near_zero_loses_precision).
  scale = rng.uniform(0.5, 2.0, features) * np.where(np.arange(features) % 2, -1, 1)
  return jaxbn.BatchNormParams(scale=jnp.asarray(scale, jnp.float32),
                               bias=jnp.asarray(rng.normal(0, 0.5, features), jnp.float32))


def _leaky(y):
  return jnp.where(y >= 0, y, SLOPE * y)


def _unfused(params, state, x, **kwargs):
  """leaky_relu(batch_norm(x)) with InPlace-ABN's scale |scale| + eps, autodiff only."""
  params = params._replace(scale=jnp.abs(params.scale) + EPS)
  y, new_state = jaxbn.batch_norm(params, state, x, training=True, **kwargs)
  return _leaky(y), new_state


def _fused(params, state, x, **kwargs):
  return jaxbn.batch_norm_activation(params, state, x, training=True, activation="leaky_relu",
                                     negative_slope=SLOPE, memory_saving=True, **kwargs)


def _value_and_grads(fn, params, state, x, weights, **kwargs):
  def loss(params, x):
    y, new_state = fn(params, state, x, **kwargs)
    # Select before multiplying: masked-out outputs may be NaN.
    y_used = jnp.where(weights != 0, y, 0)
    return jnp.sum(weights * y_used * y_used), (y, new_state)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


def _close(actual, expected, tol=1e-5):
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", [((16, 5, 5, 6), -1), ((32, 6), -1),
                                        ((8, 6, 3, 3), 1)])
def test_memory_saving_gradients_equal_the_unfused_composition(shape, axis):
  x = _data(shape)
  weights = _data(shape, seed=2, loc=0.0, scale=1.0)
  _, state = jaxbn.init(shape[axis])
  params = _params(shape[axis])
  fused = _value_and_grads(_fused, params, state, x, weights, axis=axis)
  unfused = _value_and_grads(_unfused, params, state, x, weights, axis=axis)
  _close(fused, unfused)


def test_memory_saving_with_mask_and_axis_name():
  x = _data((4, 6, 5))
  mask = jnp.asarray(np.random.default_rng(3).random((4, 6, 1)) < 0.7)
  x = jnp.where(mask, x, jnp.nan)  # masked-out slots may hold anything
  weights = jnp.where(mask, _data(x.shape, seed=2, loc=0.0), 0.0)
  _, state = jaxbn.init(5)
  params = _params(5)

  def run(fn):
    def per_replica(x, mask, weights):
      return _value_and_grads(fn, params, state, x, weights, axis_name="data",
                              mask=mask)
    (loss, (y, new_state)), (grad_params, grad_x) = jax.vmap(
        per_replica, axis_name="data")(x, mask, weights)
    return (loss.sum(), jnp.where(mask, y, 0), new_state, grad_params,
            jnp.where(mask, grad_x, 0))

  fused, unfused = run(_fused), run(_unfused)
  _close(fused, unfused)
  assert np.all(np.isfinite(fused[3].scale))


def test_memory_saving_with_a_shortcut_equals_the_unfused_residual_sum():
  """`leaky_relu(bn(x) + shortcut)`: gradients for x, the shortcut and the parameters."""
  x = _data((16, 4, 4, 6))
  shortcut = _data(x.shape, seed=4, loc=0.0)
  weights = _data(x.shape, seed=2, loc=0.0)
  _, state = jaxbn.init(6)
  params = _params(6)

  def fused(params, x, shortcut):
    y, _ = _fused(params, state, x, shortcut=shortcut)
    return jnp.sum(weights * y * y), y

  def unfused(params, x, shortcut):
    params = params._replace(scale=jnp.abs(params.scale) + EPS)
    y, _ = jaxbn.batch_norm(params, state, x, training=True)
    y = _leaky(y + shortcut)
    return jnp.sum(weights * y * y), y

  grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
  _close(grad(fused)(params, x, shortcut), grad(unfused)(params, x, shortcut))
  saved = _full_size_residuals(lambda x: _fused(params, state, x, shortcut=shortcut)[0], x)
  assert len(saved) == 2 and not any(np.array_equal(leaf, x) for leaf in saved)
  with pytest.raises(ValueError, match="shortcut must have the input's shape"):
    _fused(params, state, x, shortcut=shortcut[:2])


def test_identity_memory_saving_equals_batch_norm_with_abs_scale():
  x = _data((16, 6))
  weights = _data(x.shape, seed=2, loc=0.0)
  _, state = jaxbn.init(6)
  params = _params(6)

  def fused(params, state, x):
    return jaxbn.batch_norm_activation(params, state, x, training=True,
                                       activation="identity", memory_saving=True)

  def plain(params, state, x):
    params = params._replace(scale=jnp.abs(params.scale) + EPS)
    return jaxbn.batch_norm(params, state, x, training=True)

  _close(_value_and_grads(fused, params, state, x, weights),
         _value_and_grads(plain, params, state, x, weights))


@pytest.mark.parametrize("activation,reference", [
    ("relu", jax.nn.relu), ("leaky_relu", lambda y: jax.nn.leaky_relu(y, SLOPE)),
    ("identity", lambda y: y)])
def test_without_memory_saving_it_is_the_plain_composition(activation, reference):
  x = _data((16, 6))
  weights = _data(x.shape, seed=2, loc=0.0)
  _, state = jaxbn.init(6)
  params = _params(6)

  def fused(params, state, x):
    return jaxbn.batch_norm_activation(params, state, x, training=True,
                                       activation=activation, negative_slope=SLOPE)

  def composed(params, state, x):
    y, new_state = jaxbn.batch_norm(params, state, x, training=True)
    return reference(y), new_state

  _close(_value_and_grads(fused, params, state, x, weights),
         _value_and_grads(composed, params, state, x, weights))


@pytest.mark.parametrize("activation,reference", [
    ("relu", jax.nn.relu), ("leaky_relu", lambda y: jax.nn.leaky_relu(y, SLOPE))])
@pytest.mark.parametrize("gpu_pass", [True, False])
def test_fused_backward_with_mask_axis_name_and_shortcut(activation, reference, gpu_pass,
                                                         monkeypatch):
  """The backward pass programs compiled for GPUs use (one closed-form pass through
  the activation, saving `x`; forced here on CPU) and the others' (the two layers),
  against autodiff of the composition: masked slots holding NaN, statistics pooled
  over `vmap`'s axis, gradients for `x`, the shortcut and the parameters."""
  if gpu_pass:
    monkeypatch.setattr(_activation, "_normalize_then_act",
                        _activation._normalize_act_saving_input)
  x = _data((4, 6, 5))
  shortcut = _data(x.shape, seed=4, loc=0.0)
  mask = jnp.asarray(np.random.default_rng(3).random((4, 6, 1)) < 0.7)
  x = jnp.where(mask, x, jnp.nan)
  weights = jnp.where(mask, _data(x.shape, seed=2, loc=0.0), 0.0)
  _, state = jaxbn.init(5)
  params = _params(5)

  def fused(params, state, x, shortcut, **kwargs):
    return jaxbn.batch_norm_activation(params, state, x, training=True, activation=activation,
                                       negative_slope=SLOPE, shortcut=shortcut, **kwargs)

  def composed(params, state, x, shortcut, **kwargs):
    y, new_state = jaxbn.batch_norm(params, state, x, training=True, **kwargs)
    return reference(y + shortcut), new_state

  def run(fn):
    def per_replica(x, shortcut, mask, weights):
      def loss(params, x, shortcut):
        y, new_state = fn(params, state, x, shortcut, axis_name="data", mask=mask)
        y_used = jnp.where(weights != 0, y, 0)
        return jnp.sum(weights * y_used * y_used), (y, new_state)
      return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, shortcut)
    (loss, (y, new_state)), (grad_params, grad_x, grad_shortcut) = jax.vmap(
        per_replica, axis_name="data")(x, shortcut, mask, weights)
    return (loss.sum(), jnp.where(mask, y, 0), new_state, grad_params,
            jnp.where(mask, grad_x, 0), grad_shortcut)

  _close(run(fused), run(composed))
  if gpu_pass:
    # It keeps x and the shortcut (full size), not the activation's gradient.
    no_mask = jnp.where(mask, x, 0.0)
    saved = _full_size_residuals(lambda x: fused(params, state, x, shortcut)[0], no_mask)
    assert len(saved) == 2 and any(np.array_equal(leaf, no_mask) for leaf in saved)


def test_inference_uses_the_same_scale_as_training():
  x = _data((16, 6))
  params = _params(6)
  _, state = jaxbn.init(6)
  _, state = _fused(params, state, x)
  y, same_state = jaxbn.batch_norm_activation(params, state, x, training=False,
                                              negative_slope=SLOPE, memory_saving=True)
  assert same_state is state
  expected = _leaky((x - state.mean[None]) / jnp.sqrt(state.var[None] + EPS)
                    * (jnp.abs(params.scale[None]) + EPS) + params.bias[None])
  _close(y, expected)


def _full_size_residuals(fn, x):
  _, vjp_fn = jax.vjp(fn, x)
  return [leaf for leaf in jax.tree.leaves(vjp_fn) if getattr(leaf, "shape", None) == x.shape]


def test_memory_saving_keeps_only_the_output_for_the_backward_pass():
  x = _data((16, 4, 4, 6))
  _, state = jaxbn.init(6)
  params = _params(6)
  saved = _full_size_residuals(lambda x: _fused(params, state, x)[0], x)
  assert len(saved) == 1
  np.testing.assert_array_equal(saved[0], _fused(params, state, x)[0])
  # The unfused pair keeps the input (and more): what the option removes.
  unfused_saved = _full_size_residuals(lambda x: _unfused(params, state, x)[0], x)
  assert len(unfused_saved) >= 2
  assert any(np.array_equal(leaf, x) for leaf in unfused_saved)


def test_scale_near_zero_loses_precision_of_the_scale_gradient():
  """The documented caveat: with |scale| ~ eps, x_hat = (z - bias) / scale is rounding noise."""
  x = _data((64, 3))
  weights = _data(x.shape, seed=2, loc=0.0)
  _, state = jaxbn.init(3)
  params = jaxbn.BatchNormParams(scale=jnp.array([1.0, 0.0, 1.0]),
                                 bias=jnp.array([0.5, 0.5, 0.5]))
  (_, _), (fused_grads, _) = _value_and_grads(_fused, params, state, x, weights)
  (_, _), (unfused_grads, _) = _value_and_grads(_unfused, params, state, x, weights)
  error = np.abs(np.asarray(fused_grads.scale - unfused_grads.scale))
  assert error[0] < 1e-4 and error[2] < 1e-4
  assert error[1] > 1e-3  # the zero scale: the gradient is approximate


def test_errors_name_the_argument():
  params, state = jaxbn.init(3)
  x = _data((8, 3))
  with pytest.raises(ValueError, match="memory_saving=True recovers"):
    jaxbn.batch_norm_activation(params, state, x, training=True, activation="relu",
                                memory_saving=True)
  with pytest.raises(ValueError, match="activation must be one of"):
    jaxbn.batch_norm_activation(params, state, x, training=True, activation="gelu")
  with pytest.raises(ValueError, match="negative_slope"):
    jaxbn.batch_norm_activation(params, state, x, training=True, negative_slope=-0.1)
  with pytest.raises(ValueError, match="negative_slope > 0"):
    jaxbn.batch_norm_activation(params, state, x, training=True, negative_slope=0.0,
                                memory_saving=True)
  with pytest.raises(ValueError, match="memory_saving"):
    jaxbn_linen.BatchNorm(use_running_average=False, memory_saving=True).init(
        jax.random.key(0), x)


# ------------------------------------------------------------ the flax adapters


class FlaxPair(nn.Module):
  """flax.linen.BatchNorm + leaky_relu: the reference of the fused linen layer."""

  @nn.compact
  def __call__(self, x):
    norm = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False,
                        name="norm")
    return jax.nn.leaky_relu(norm(x), SLOPE)


def test_linen_memory_saving_equals_flax_batch_norm_and_leaky_relu():
  x = _data((8, 4, 4, 6))
  weights = _data(x.shape, seed=2, loc=0.0)
  params = _params(6)
  fused = jaxbn_linen.BatchNorm(use_running_average=False, momentum=0.9,
                                activation="leaky_relu", negative_slope=SLOPE,
                                memory_saving=True)
  batch_stats = fused.init(jax.random.key(0), x)["batch_stats"]

  def ours(scale, bias, x):
    y, updates = fused.apply({"params": {"scale": scale, "bias": bias},
                              "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return jnp.sum(weights * y * y), (y, updates["batch_stats"])

  def theirs(scale, bias, x):
    variables = {"params": {"norm": {"scale": jnp.abs(scale) + EPS, "bias": bias}},
                 "batch_stats": {"norm": batch_stats}}
    y, updates = FlaxPair().apply(variables, x, mutable=["batch_stats"])
    return jnp.sum(weights * y * y), (y, updates["batch_stats"]["norm"])

  grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
  _close(grad(ours)(params.scale, params.bias, x), grad(theirs)(params.scale, params.bias, x),
         tol=1e-4)


def test_nnx_memory_saving_matches_linen():
  x = _data((8, 6))
  params = _params(6)
  layer = jaxbn_nnx.BatchNorm(6, momentum=0.9, activation="leaky_relu", negative_slope=SLOPE,
                              memory_saving=True, rngs=nnx.Rngs(0))
  layer.scale[...] = params.scale
  layer.bias[...] = params.bias
  y = layer(x)
  expected, state = _fused(params, jaxbn.init(6)[1], x, momentum=0.9)
  _close(y, expected)
  _close((layer.mean[...], layer.var[...]), (state.mean, state.var))
  layer.eval()
  _close(layer(x), jaxbn.batch_norm_activation(params, state, x, training=False,
                                               negative_slope=SLOPE, memory_saving=True)[0])


class _ConvNet(nn.Module):
  """Four conv -> BN + activation pairs, bf16 activations."""
  memory_saving: bool

  @nn.compact
  def __call__(self, x):
    for features in (16, 16, 32, 32):
      x = nn.Conv(features, (3, 3), use_bias=False, dtype=jnp.bfloat16)(x)
      if self.memory_saving:
        x = jaxbn_linen.BatchNorm(use_running_average=False, dtype=jnp.bfloat16,
                                  activation="leaky_relu", memory_saving=True)(x)
      else:
        x = jax.nn.leaky_relu(
            jaxbn_linen.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)(x))
    return jnp.mean(x.astype(jnp.float32))


def _compiled_temp_bytes(memory_saving):
  model = _ConvNet(memory_saving)
  x = jnp.ones((16, 16, 16, 3), jnp.bfloat16)
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    y, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return y

  compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_saving_lowers_the_compiled_step_memory():
  """XLA:CPU's buffer assignment: the BN inputs are no longer kept."""
  plain, saving = _compiled_temp_bytes(False), _compiled_temp_bytes(True)
  activation_bytes = 16 * 16 * 16 * (16 + 16 + 32 + 32) * 2  # the four BN inputs, bf16
  assert saving <= plain - activation_bytes // 2, (plain, saving)
