"""Flax workflows run with flax's BatchNorm and with jaxbn's adapter: same results.

Each test builds one model twice, once with `flax.linen.BatchNorm` /
`flax.nnx.BatchNorm` (`use_fast_variance=False`, its accurate variance) and
once with the jaxbn adapter swapped in, runs a common flax workflow with both
and compares the variables and outputs. Several use a batch of one example,
where flax's variance is 0 (the output is `bias`) and jaxbn's core would raise.
"""

import functools

import chex
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from tests import helpers

MOMENTUM = 0.8
FEATURES = 4


pytestmark = pytest.mark.usefixtures("classic_threefry")


_data = functools.partial(helpers.normal, loc=1.5, scale=2.0)


def _close(actual, expected):
  chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------- flax.linen


class LinenBlock(nn.Module):
  """Dense -> BatchNorm -> relu, with the BatchNorm class as a field."""
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(FEATURES)(x)
    x = self.norm(use_running_average=not train, momentum=MOMENTUM,
                  use_fast_variance=False, bias_init=nn.initializers.constant(0.3))(x)
    return nn.relu(x)


def _linen_pair():
  return LinenBlock(nn.BatchNorm), LinenBlock(jaxbn_linen.BatchNorm)


@pytest.mark.parametrize("batch", [1, 3])
def test_linen_init_in_training_mode_and_train_step(batch):
  """`model.init(key, dummy, train=True)` with a batch-1 dummy, then a training step."""
  dummy = jnp.ones((1, 3))
  x = _data((batch, 3))
  results = []
  for model in _linen_pair():
    variables = model.init(jax.random.key(0), dummy, train=True)

    def loss_fn(params, model=model, variables=variables):
      y, updates = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(y * jnp.arange(y.size).reshape(y.shape)), (y, updates)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    results.append((variables, loss, aux, grads))
  _close(results[1], results[0])
  stats = results[1][2][1]["batch_stats"]["BatchNorm_0"]
  assert np.all(np.abs(stats["mean"]) > 0)  # the statistics moved


def test_linen_bind_with_mutable_batch_stats():
  x = _data((1, 3), seed=1)
  results = []
  for model in _linen_pair():
    variables = model.init(jax.random.key(0), _data((5, 3)), train=False)
    bound = model.bind(variables, mutable=["batch_stats"])
    y_train = bound(x, train=True)
    y_eval = bound(x, train=False)
    results.append((y_train, y_eval, bound.variables))
  _close(results[1], results[0])
  np.testing.assert_allclose(results[1][0], 0.3)  # one example: relu(bias)


class LinenScanned(nn.Module):
  """Three LinenBlocks under nn.scan (stacked params and batch_stats)."""
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    def body(block, carry, _):
      return block(carry, train), None
    scanned = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                      variable_broadcast=False, split_rngs={"params": True},
                      length=3)
    x, _ = scanned(LinenBlock(self.norm, name="blocks"), x, None)
    return x


@pytest.mark.parametrize("batch", [1, 4])
def test_linen_scan_over_layers(batch):
  x = _data((batch, FEATURES), seed=2)
  results = []
  for norm in (nn.BatchNorm, jaxbn_linen.BatchNorm):
    model = LinenScanned(norm)
    variables = model.init(jax.random.key(0), x, train=True)
    y, updates = jax.jit(functools.partial(model.apply, train=True,
                                           mutable=["batch_stats"]))(variables, x)
    y_eval = model.apply({**variables, **updates}, x, train=False)
    results.append((variables, y, updates, y_eval))
  _close(results[1], results[0])
  assert results[1][0]["batch_stats"]["blocks"]["BatchNorm_0"]["mean"].shape == (
      3, FEATURES)


# ------------------------------------------------------------------- flax.nnx


class NnxBlock(nnx.Module):
  """Linear -> BatchNorm -> relu, with the BatchNorm class as an argument."""

  def __init__(self, norm, *, rngs):
    self.linear = nnx.Linear(FEATURES, FEATURES, rngs=rngs)
    self.norm = norm(FEATURES, momentum=MOMENTUM, use_fast_variance=False,
                     bias_init=nnx.initializers.constant(0.3), rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm(self.linear(x)))


def _nnx_state(model):
  return nnx.to_pure_dict(nnx.state(model))


def test_nnx_training_with_one_example():
  x = _data((1, FEATURES), seed=3)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    model = NnxBlock(norm, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(model):
      def loss_fn(model):
        y = model(x)
        return jnp.sum(y * jnp.arange(1.0, y.size + 1).reshape(y.shape)), y
      (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      return loss, y, grads

    loss, y, grads = step(model)
    results.append((loss, y, nnx.to_pure_dict(grads), _nnx_state(model)))
  _close(results[1], results[0])
  np.testing.assert_allclose(results[1][1], 0.3)


def test_nnx_tabulate_with_a_batch_of_one():
  tables, states = [], []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    model = NnxBlock(norm, rngs=nnx.Rngs(0))
    tables.append(nnx.tabulate(model, jnp.ones((1, FEATURES))))
    states.append(_nnx_state(model))
  _close(states[1], states[0])
  # Same rows, shapes and parameter counts (the class path is not in the table).
  assert tables[1] == tables[0]


def test_nnx_init_with_a_training_mode_dummy_call():
  """Build, run a batch-1 dummy through in training mode (a shape check), train."""
  x = _data((6, FEATURES), seed=4)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    model = NnxBlock(norm, rngs=nnx.Rngs(0))
    dummy_out = model(jnp.ones((1, FEATURES)))
    y = model(x)
    model.eval()
    results.append((dummy_out, y, model(x), _nnx_state(model)))
  _close(results[1], results[0])


def _stacked_blocks(norm, count):
  """`count` NnxBlocks stacked on axis 0, each with its own rng draws."""
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return NnxBlock(norm, rngs=rngs)
  return create(nnx.Rngs(0))


def test_nnx_scan_over_layers():
  x = _data((1, FEATURES), seed=5)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    blocks = _stacked_blocks(norm, 3)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    y = forward(x, blocks)
    for xs in (_data((5, FEATURES), seed=6), x):
      y_more = forward(xs, blocks)
    results.append((y, y_more, _nnx_state(blocks)))
  _close(results[1], results[0])
  assert results[1][2]["norm"]["mean"].shape == (3, FEATURES)


def test_nnx_vmap_ensemble_with_split_rngs_and_state_axes():
  """An ensemble of 2 models, one example each: StateAxes map params and stats."""
  x = _data((2, 1, FEATURES), seed=7)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    ensemble = _stacked_blocks(norm, 2)
    state_axes = nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0})

    @nnx.vmap(in_axes=(state_axes, 0), out_axes=0)
    def forward(model, x):
      return model(x)

    y = forward(ensemble, x)
    results.append((y, _nnx_state(ensemble)))
  _close(results[1], results[0])


def test_nnx_train_state_helpers():
  """`nnx.TrainState` with the batch statistics as an extra field, and optax."""

  class TrainState(nnx.TrainState):
    batch_stats: nnx.State

  x = _data((1, FEATURES), seed=8)
  results = []
  for norm in (nnx.BatchNorm, jaxbn_nnx.BatchNorm):
    graphdef, params, batch_stats = nnx.split(NnxBlock(norm, rngs=nnx.Rngs(0)),
                                              nnx.Param, nnx.BatchStat)
    state = TrainState.create(graphdef, params=params, tx=optax.sgd(0.1),
                              batch_stats=batch_stats)

    @jax.jit
    def train_step(state):
      def loss_fn(params):
        # Fresh BatchStat variables at this trace level (nnx mutates them).
        batch_stats = jax.tree.map(lambda value: value, state.batch_stats)
        y, (_, new_state) = state.apply(params, batch_stats)(x)
        return jnp.sum(y * jnp.arange(1.0, y.size + 1).reshape(y.shape)), new_state
      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      _, new_batch_stats = nnx.split_state(new_state, nnx.Param, nnx.BatchStat)
      return loss, state.apply_gradients(grads, batch_stats=new_batch_stats)

    for _ in range(2):
      loss, state = train_step(state)
    results.append((loss, nnx.to_pure_dict(state.params),
                    nnx.to_pure_dict(state.batch_stats)))
  _close(results[1], results[0])
