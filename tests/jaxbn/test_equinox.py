"""Equinox workflows run with `eqx.nn.BatchNorm` and with `jaxbn.equinox.BatchNorm`.

Each test builds the same model twice, once with Equinox's layer and once with
the drop-in, runs an Equinox workflow (`make_with_state`, `jax.vmap` with
`axis_name`, `inference_mode`, `Sequential`, training) with both and compares
outputs and states. Where the two differ by design (Equinox's "ema" mode
normalizes training batches with EMA-mixed statistics; its "batch" mode
debiases the hidden variance as if it started at 0), the test checks the
drop-in against the standard batch norm instead.
"""

import functools
import warnings

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import equinox as jaxbn_eqx
from tests import helpers

MOMENTUM = 0.9
CHANNELS = 3


_data = functools.partial(helpers.normal, loc=1.5, scale=2.0)


def _close(actual, expected, tol=2e-5):
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


def _make(cls, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Equinox's "mode unspecified" warning
    return eqx.nn.make_with_state(cls)(*args, **kwargs)


def _batched(layer, axis_name="batch"):
  return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def _run(cls, batches, *, mode, inference_x=None, **kwargs):
  """Training calls on `batches`, then one inference call; outputs and states."""
  layer, state = _make(cls, CHANNELS, "batch", momentum=MOMENTUM, mode=mode, **kwargs)
  train = jax.jit(_batched(layer))
  outputs, states = [], []
  for x in batches:
    y, state = train(x, state)
    outputs.append(y)
    states.append(jax.tree.leaves(state))
  inference_x = batches[0] if inference_x is None else inference_x
  y_eval, _ = _batched(eqx.nn.inference_mode(layer))(inference_x, state)
  return outputs, states, y_eval, state


def _standard_batch_norm(x, weight=None, bias=None, eps=1e-5):
  """Batch norm of `(N, C, ...)` with the batch's statistics per channel."""
  axes = (0,) + tuple(range(2, x.ndim))
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.var(x, axes, keepdims=True)
  y = (x - mean) / jnp.sqrt(var + eps)
  if weight is not None:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = y * weight.reshape(shape) + bias.reshape(shape)
  return y


BATCHES = [_data((8, CHANNELS, 5, 5), seed) * (seed + 1) for seed in range(3)]


def test_ema_mode_states_equal_equinox_and_training_uses_batch_statistics():
  eqx_out, eqx_states, eqx_eval, _ = _run(eqx.nn.BatchNorm, BATCHES, mode="ema")
  out, states, y_eval, _ = _run(jaxbn_eqx.BatchNorm, BATCHES, mode="ema")
  _close(states, eqx_states)  # the running averages are the same numbers
  _close(y_eval, eqx_eval)
  _close(out[0], eqx_out[0])  # first call: Equinox also uses the batch statistics
  for x, y, y_eqx in zip(BATCHES[1:], out[1:], eqx_out[1:]):
    _close(y, _standard_batch_norm(x))
    assert not np.allclose(y, y_eqx, atol=1e-2)  # Equinox mixes in the EMA (equinox#659)


def test_ema_state_index_holds_running_mean_and_var():
  layer, state = _make(jaxbn_eqx.BatchNorm, CHANNELS, "batch", momentum=MOMENTUM, mode="ema")
  mean, var = state.get(layer.ema_state_index)
  _close((mean, var), (jnp.zeros(CHANNELS), jnp.ones(CHANNELS)))
  assert state.get(layer.ema_first_time_index)
  _, state = _batched(layer)(BATCHES[0], state)
  mean, var = state.get(layer.ema_state_index)
  axes = (0, 2, 3)
  _close((mean, var), (jnp.mean(BATCHES[0], axes), jnp.var(BATCHES[0], axes)))
  assert not state.get(layer.ema_first_time_index)


def test_batch_mode_training_equals_equinox_and_inference_is_debiased():
  eqx_out, eqx_states, eqx_eval, _ = _run(eqx.nn.BatchNorm, BATCHES, mode="batch")
  out, states, y_eval, state = _run(jaxbn_eqx.BatchNorm, BATCHES, mode="batch")
  _close(out, eqx_out)
  _close(states, eqx_states)
  # Inference: the EMA-weighted averages of the batch statistics.
  axes = (0, 2, 3)
  weights = np.array([(1 - MOMENTUM) * MOMENTUM**(len(BATCHES) - 1 - i)
                      for i in range(len(BATCHES))])
  weights = weights / weights.sum()
  mean = sum(w * jnp.mean(x, axes) for w, x in zip(weights, BATCHES))
  var = sum(w * jnp.var(x, axes) for w, x in zip(weights, BATCHES))
  expected = ((BATCHES[0] - mean[None, :, None, None])
              / jnp.sqrt(var[None, :, None, None] + 1e-5))
  _close(y_eval, expected, tol=1e-4)
  assert not np.allclose(eqx_eval, expected, atol=1e-2)  # Equinox's inflated variance


def test_batch_mode_inference_before_training_equals_equinox():
  x = BATCHES[0]
  results = []
  for cls in (eqx.nn.BatchNorm, jaxbn_eqx.BatchNorm):
    layer, state = _make(cls, CHANNELS, "batch", mode="batch")
    results.append(_batched(lambda x, s, layer=layer: layer(x, s, inference=True))(x, state)[0])
  _close(results[1], results[0])


@pytest.mark.parametrize("affine", [True, False])
def test_half_precision_input_output_dtypes(affine):
  x = BATCHES[0].astype(jnp.bfloat16)
  results = []
  for cls in (eqx.nn.BatchNorm, jaxbn_eqx.BatchNorm):
    layer, state = _make(cls, CHANNELS, "batch", channelwise_affine=affine, mode="batch")
    assert (layer.weight is None) == (layer.bias is None) == (not affine)
    y, state = _batched(layer)(x, state)
    y_eval, _ = _batched(eqx.nn.inference_mode(layer))(x, state)
    results.append((y, jax.tree.leaves(state), y_eval))
  for ours, theirs in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
    assert ours.dtype == theirs.dtype
  # Equinox's bf16 statistics vs jaxbn's float32 ones: bf16 rounding apart.
  _close(results[1][:2], results[0][:2], tol=3e-2)


def test_half_precision_input_in_ema_mode():
  """Equinox's "ema" mode fails on bf16 input (lax.select of f32 and bf16); jaxbn's runs."""
  x = BATCHES[0].astype(jnp.bfloat16)
  layer, state = _make(jaxbn_eqx.BatchNorm, CHANNELS, "batch", mode="ema")
  y, state = _batched(layer)(x, state)
  assert y.dtype == jnp.float32
  _close(y, _standard_batch_norm(x.astype(jnp.float32)), tol=2e-2)
  assert state.get(layer.ema_state_index)[1].dtype == jnp.float32


@pytest.mark.parametrize("axis_names", [("outer", "inner"), ["outer", "inner"]])
def test_nested_vmaps_with_a_tuple_of_axis_names(axis_names):
  x = _data((2, 4, CHANNELS, 3))
  results = []
  for cls in (eqx.nn.BatchNorm, jaxbn_eqx.BatchNorm):
    layer, state = _make(cls, CHANNELS, axis_names, momentum=MOMENTUM, mode="batch")
    inner = jax.vmap(layer, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = outer(x, state)
    results.append((y, jax.tree.leaves(state)))
  _close(results[1], results[0])
  _close(results[1][0], _standard_batch_norm(x.reshape(8, CHANNELS, 3)).reshape(x.shape))


def test_sequential_inference_mode_and_call_override():

  def build(cls):
    key1, key2 = jax.random.split(jax.random.key(0))
    return eqx.nn.Sequential([
        eqx.nn.Linear(4, CHANNELS, key=key1),
        cls(CHANNELS, "batch", momentum=MOMENTUM, mode="ema"),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(CHANNELS, 2, key=key2),
    ])

  x = _data((6, 4))
  results = []
  for cls in (eqx.nn.BatchNorm, jaxbn_eqx.BatchNorm):
    model, state = _make(build, cls)
    y_train, state = _batched(model)(x, state)
    y_eval, _ = _batched(eqx.nn.inference_mode(model))(x, state)
    # `inference=` at call time overrides the attribute.
    layer = eqx.nn.inference_mode(model)[1]
    hidden = jax.vmap(model[0])(x)
    y_override, _ = _batched(lambda h, s, layer=layer: layer(h, s, inference=False))(
        hidden, state)
    results.append((y_train, y_eval, y_override, jax.tree.leaves(state)))
  _close(results[1], results[0])
  assert eqx.nn.inference_mode(model)[1].inference


def test_gradients_equal_equinox():
  x = BATCHES[0]
  weights = _data(x.shape, seed=7)
  results = []
  for cls in (eqx.nn.BatchNorm, jaxbn_eqx.BatchNorm):
    layer, state = _make(cls, CHANNELS, "batch", mode="batch")
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer,
                        (jnp.array([1.0, -2.0, 0.5]), jnp.array([0.1, 0.2, 0.3])))

    def loss(layer_and_x, state=state):
      layer, x = layer_and_x
      y, _ = _batched(layer)(x, state)
      return jnp.sum(weights * y * y)

    results.append(eqx.filter_grad(loss)((layer, x)))
  grads_eqx, grads = results
  _close((grads[0].weight, grads[0].bias, grads[1]),
         (grads_eqx[0].weight, grads_eqx[0].bias, grads_eqx[1]), tol=1e-4)


def test_unbound_axis_name_raises_name_error():
  layer, state = _make(jaxbn_eqx.BatchNorm, CHANNELS, "batch", mode="batch")
  with pytest.raises(NameError):
    jax.vmap(layer, axis_name="other", in_axes=(0, None), out_axes=(0, None))(
        BATCHES[0], state)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="mode"):
    jaxbn_eqx.BatchNorm(CHANNELS, "batch", mode="average")
  with pytest.raises(ValueError, match="momentum"):
    jaxbn_eqx.BatchNorm(CHANNELS, "batch", momentum=1.0)
  layer, state = _make(jaxbn_eqx.BatchNorm, CHANNELS, "batch", mode="batch")
  with pytest.raises(ValueError, match="input_size=3"):
    _batched(layer)(jnp.ones((4, 5, 2)), state)


def test_default_mode_is_ema_without_a_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    layer = jaxbn_eqx.BatchNorm(CHANNELS, "batch")
  assert layer.mode == "ema"
  assert layer.batch_counter is None and layer.ema_state_index is not None


# ----------------------------------------------------------- training a ResNet


class Block(eqx.Module):
  """conv -> BN -> relu -> conv -> BN, plus the input, then relu."""
  conv1: eqx.nn.Conv2d
  norm1: eqx.Module
  conv2: eqx.nn.Conv2d
  norm2: eqx.Module

  def __init__(self, channels, norm, key):
    key1, key2 = jax.random.split(key)
    self.conv1 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=key1)
    self.norm1 = norm(channels)
    self.conv2 = eqx.nn.Conv2d(channels, channels, 3, padding=1, use_bias=False, key=key2)
    self.norm2 = norm(channels)

  def __call__(self, x, state):
    y, state = self.norm1(self.conv1(x), state)
    y, state = self.norm2(self.conv2(jax.nn.relu(y)), state)
    return jax.nn.relu(x + y), state


class TinyResNet(eqx.Module):
  stem: eqx.nn.Conv2d
  norm: eqx.Module
  blocks: list
  head: eqx.nn.Linear

  def __init__(self, norm, key):
    keys = jax.random.split(key, 4)
    self.stem = eqx.nn.Conv2d(1, 8, 3, padding=1, use_bias=False, key=keys[0])
    self.norm = norm(8)
    self.blocks = [Block(8, norm, keys[1]), Block(8, norm, keys[2])]
    self.head = eqx.nn.Linear(8, 4, key=keys[3])

  def __call__(self, x, state):
    x, state = self.norm(self.stem(x), state)
    x = jax.nn.relu(x)
    for block in self.blocks:
      x, state = block(x, state)
    return self.head(jnp.mean(x, axis=(1, 2))), state


def _train(norm, steps=6):
  model, state = _make(TinyResNet, norm, jax.random.key(0))
  images = _data((16, 1, 8, 8), seed=3)
  labels = jnp.arange(16) % 4

  @eqx.filter_jit
  def step(model, state):
    def loss_fn(model):
      logits, new_state = _batched(model)(images, state)
      log_probs = jax.nn.log_softmax(logits)
      return -jnp.mean(log_probs[jnp.arange(16), labels]), new_state
    (loss, new_state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
    return model, new_state, loss

  losses = []
  for _ in range(steps):
    model, state, loss = step(model, state)
    losses.append(loss)
  logits_eval, _ = _batched(eqx.nn.inference_mode(model))(images, state)
  return jnp.stack(losses), state, logits_eval


def test_resnet_trains_to_the_same_losses():
  def make(cls, mode):
    return lambda channels: cls(channels, "batch", momentum=MOMENTUM, mode=mode)

  eqx_losses, eqx_state, _ = _train(make(eqx.nn.BatchNorm, "batch"))
  losses, state, _ = _train(make(jaxbn_eqx.BatchNorm, "batch"))
  _close(losses, eqx_losses, tol=1e-4)
  _close(jax.tree.leaves(state), jax.tree.leaves(eqx_state), tol=1e-4)
  assert float(losses[-1]) < float(losses[0])  # it trains
  # jaxbn's "ema" mode trains like standard batch norm, i.e. like "batch".
  ema_losses, _, ema_eval = _train(make(jaxbn_eqx.BatchNorm, "ema"))
  _close(ema_losses, eqx_losses, tol=1e-4)
  assert np.all(np.isfinite(ema_eval))


def test_core_function_gives_the_same_state_update():
  """The "batch" mode hidden state is `jaxbn.batch_norm`'s running state."""
  x = BATCHES[0]
  layer, state = _make(jaxbn_eqx.BatchNorm, CHANNELS, "batch", momentum=MOMENTUM,
                       mode="batch")
  _, state = _batched(layer)(x, state)
  params, core_state = jaxbn.init(CHANNELS)
  _, core_state = jaxbn.batch_norm(params, core_state, x, training=True, axis=1,
                                   momentum=MOMENTUM)
  _close(state.get(layer.batch_state_index), (core_state.mean, core_state.var))
