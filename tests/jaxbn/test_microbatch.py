"""Microbatches: running statistics updated once per step from pooled moments.

After k microbatches the running statistics must equal what one training call
on the concatenated batch gives (float32, 1e-6), in the core and in the flax
adapters; normalizing with the pooled statistics (the two-pass alternative)
must reproduce the full batch's outputs where the inputs of the layer do not
depend on another batch norm.
"""

import functools

import chex
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import linen as jaxbn_linen
from jaxbn import nnx as jaxbn_nnx
from tests import helpers

K = 4
MOMENTUM = 0.9


_data = functools.partial(helpers.normal, loc=3.0, scale=2.0)


def _exact(actual, expected):
  chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-6)


def _started_state(features):
  """A state after a few updates (count > 0, so the shift is the running mean)."""
  params, state = jaxbn.init(features)
  for seed in range(3):
    _, state = jaxbn.batch_norm(params, state, _data((16, features), seed=10 + seed),
                                training=True, momentum=MOMENTUM)
  return params, state


@pytest.mark.parametrize("momentum,unbiased", [(MOMENTUM, False), (0.5, True), (None, False)])
def test_pooled_update_equals_the_full_batch_update(momentum, unbiased):
  params, state = _started_state(5)
  x = _data((K * 8, 6, 5))
  _, full_state = jaxbn.batch_norm(params, state, x, training=True, momentum=momentum,
                                   unbiased_running_var=unbiased)
  pooled = jaxbn.empty_moments(5)
  for microbatch in jnp.split(x, K):
    y, moments = jaxbn.batch_norm_moments(params, state, microbatch, momentum=momentum)
    expected_y, _ = jaxbn.batch_norm(params, state, microbatch, training=True,
                                     momentum=momentum)
    np.testing.assert_array_equal(y, expected_y)  # each microbatch: its own statistics
    pooled = jaxbn.merge_moments(pooled, moments)
  new_state = jaxbn.update_stats(state, pooled, momentum=momentum,
                                 unbiased_running_var=unbiased)
  _exact(new_state, full_state)
  # Updating once per microbatch (what a plain loop does) is not the same.
  looped = state
  for microbatch in jnp.split(x, K):
    _, looped = jaxbn.batch_norm(params, looped, microbatch, training=True,
                                 momentum=momentum, unbiased_running_var=unbiased)
  assert not np.allclose(looped.var, full_state.var, rtol=1e-3)


def test_one_microbatch_update_equals_batch_norm_exactly():
  params, state = _started_state(3)
  x = _data((16, 3))
  _, expected = jaxbn.batch_norm(params, state, x, training=True, momentum=MOMENTUM)
  _, moments = jaxbn.batch_norm_moments(params, state, x, momentum=MOMENTUM)
  chex.assert_trees_all_equal(jaxbn.update_stats(state, moments, momentum=MOMENTUM), expected)


def test_masked_microbatches_of_different_sizes_pool_count_weighted():
  params, state = _started_state(4)
  x = _data((K * 6, 4))
  mask = jnp.asarray(np.random.default_rng(1).random((K * 6, 1)) < 0.6)
  _, full_state = jaxbn.batch_norm(params, state, x, training=True, momentum=MOMENTUM,
                                   mask=mask)
  pooled = jaxbn.empty_moments(4)
  for xs, ms in zip(jnp.split(x, K), jnp.split(mask, K)):
    pooled = jaxbn.merge_moments(
        pooled, jaxbn.batch_norm_moments(params, state, xs, momentum=MOMENTUM, mask=ms)[1])
  _exact(jaxbn.update_stats(state, pooled, momentum=MOMENTUM), full_state)
  np.testing.assert_array_equal(pooled.count, jnp.full((4,), jnp.sum(mask), jnp.float32))


def test_gradients_of_accumulated_microbatches_in_a_jitted_scan():
  """The gradient-accumulation loop: lax.scan over microbatches, moments in the carry."""
  params, state = _started_state(3)
  x = _data((K * 8, 3))

  def loss(params, microbatch):
    y, moments = jaxbn.batch_norm_moments(params, state, microbatch, momentum=MOMENTUM)
    return jnp.sum(y * y * jnp.arange(3.0)[None]), moments

  @jax.jit
  def step(params, x):
    def body(carry, microbatch):
      grads, pooled = carry
      (_, moments), g = jax.value_and_grad(loss, has_aux=True)(params, microbatch)
      return (jax.tree.map(jnp.add, grads, g), jaxbn.merge_moments(pooled, moments)), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, pooled), _ = jax.lax.scan(body, (zeros, jaxbn.empty_moments(3)),
                                      x.reshape(K, 8, 3))
    return grads, jaxbn.update_stats(state, pooled, momentum=MOMENTUM)

  grads, new_state = step(params, x)
  _, full_state = jaxbn.batch_norm(params, state, x, training=True, momentum=MOMENTUM)
  _exact(new_state, full_state)
  per_microbatch = [jax.grad(lambda p, m: loss(p, m)[0])(params, m) for m in jnp.split(x, K)]
  expected = jax.tree.map(lambda *g: sum(g), *per_microbatch)
  chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-5)


def test_two_pass_normalizes_every_microbatch_with_the_full_batch_statistics():
  params, state = _started_state(5)
  params = params._replace(scale=jnp.linspace(0.5, 2.0, 5), bias=jnp.linspace(-1, 1, 5))
  x = _data((K * 8, 5))
  full_y, full_state = jaxbn.batch_norm(params, state, x, training=True, momentum=MOMENTUM)
  pooled = jaxbn.empty_moments(5)
  for microbatch in jnp.split(x, K):  # first pass: statistics only
    pooled = jaxbn.merge_moments(
        pooled, jaxbn.batch_norm_moments(params, state, microbatch, momentum=MOMENTUM)[1])
  outputs = [jaxbn.batch_norm(params, jaxbn.moments_state(state, pooled), microbatch,
                              training=False)[0] for microbatch in jnp.split(x, K)]
  chex.assert_trees_all_close(jnp.concatenate(outputs), full_y, rtol=1e-5, atol=1e-5)
  _exact(jaxbn.update_stats(state, pooled, momentum=MOMENTUM), full_state)


def test_update_stats_checks_its_arguments():
  _, state = jaxbn.init(3)
  with pytest.raises(ValueError, match="momentum"):
    jaxbn.update_stats(state, jaxbn.empty_moments(3), momentum=1.5)
  with pytest.raises(ValueError, match=r"moments.count has shape \(4,\)"):
    jaxbn.update_stats(state, jaxbn.empty_moments(4), momentum=0.9)


# ------------------------------------------------------------ the flax adapters


class ConvNet(nn.Module):
  """conv -> BN -> relu -> dense: one BN, whose input is the same in either run."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(6, (3, 3), use_bias=False)(x)
    x = jaxbn_linen.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
    return nn.Dense(2)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _linen_setup():
  model = ConvNet()
  x = _data((K * 4, 6, 6, 2))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  # Start from non-trivial running statistics.
  _, updates = model.apply(variables, _data(x.shape, seed=5), train=True,
                           mutable=["batch_stats"])
  return model, x, {**variables, **updates}


@pytest.mark.parametrize("thread_batch_stats", [True, False])
def test_linen_accumulated_batch_stats_equal_the_full_batch(thread_batch_stats):
  model, x, variables = _linen_setup()
  _, full = model.apply(variables, x, train=True, mutable=["batch_stats"])
  batch_stats, moments = variables["batch_stats"], None
  for microbatch in jnp.split(x, K):
    given = {"params": variables["params"],
             "batch_stats": batch_stats if thread_batch_stats else variables["batch_stats"]}
    if moments is not None:
      given["batch_moments"] = moments
    _, updates = model.apply(given, microbatch, train=True,
                             mutable=["batch_stats", "batch_moments"])
    batch_stats, moments = updates["batch_stats"], updates["batch_moments"]
  _exact(batch_stats, full["batch_stats"])
  assert int(moments["BatchNorm_0"]["moments"]["microbatches"]) == K


def test_linen_two_pass_outputs_equal_the_full_batch_outputs():
  model, x, variables = _linen_setup()
  full_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  moments = None
  for microbatch in jnp.split(x, K):
    given = dict(variables) if moments is None else {**variables, "batch_moments": moments}
    _, updates = model.apply(given, microbatch, train=True,
                             mutable=["batch_stats", "batch_moments"])
    moments = updates["batch_moments"]
  pooled = {"params": variables["params"],
            "batch_stats": jaxbn_linen.pooled_batch_stats(moments)}
  logits = jnp.concatenate([model.apply(pooled, m, train=False) for m in jnp.split(x, K)])
  chex.assert_trees_all_close(logits, full_logits, rtol=1e-5, atol=1e-5)


def test_linen_without_the_collection_behaves_as_before():
  model, x, variables = _linen_setup()
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  assert "batch_moments" not in model.init(jax.random.key(0), x[:1], train=True)


def test_nnx_accumulated_statistics_equal_the_full_batch():
  x = _data((K * 4, 5))
  layers = [jaxbn_nnx.BatchNorm(5, momentum=MOMENTUM, rngs=nnx.Rngs(0)) for _ in range(2)]
  layers[0](x)
  full = layers[0].mean[...], layers[0].var[...]
  layers[1].set_view(accumulate_moments=True)
  step = nnx.jit(lambda layer, microbatch: layer(microbatch))
  for microbatch in jnp.split(x, K):
    step(layers[1], microbatch)
  _exact((layers[1].mean[...], layers[1].var[...]), full)
  jaxbn_nnx.reset_moments(layers[1])
  assert layers[1].batch_moments is None
  assert "batch_moments" not in nnx.state(layers[0])
