"""PreciseBN and replica sync over flax variables, against the core functions.

`jaxbn.linen.recompute_stats` / `jaxbn.nnx.recompute_stats` must give what
`jaxbn.recompute_stats` gives for the same network written with the core
`jaxbn.batch_norm`, and `jaxbn.linen.sync_stats` / `jaxbn.nnx.sync_stats` what
`jaxbn.sync_stats` gives for the same statistics.
"""

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


class _LinenMLP(nn.Module):
  """Dense -> BN -> relu -> Dense -> BN: the second BN's input depends on the first."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6, name="dense0")(x)
    x = jaxbn_linen.BatchNorm(use_running_average=not train, momentum=0.9, name="bn0")(x)
    x = nn.relu(x)
    x = nn.Dense(4, name="dense1")(x)
    return jaxbn_linen.BatchNorm(use_running_average=not train, momentum=0.9,
                                 name="bn1")(x)


def _core_twin(variables):
  """The same network with `jaxbn.batch_norm`: `(apply_fn, params, state)`."""
  p = variables["params"]

  def apply_fn(params, state, x):
    x = x @ params["dense0"]["kernel"] + params["dense0"]["bias"][None]
    x, s0 = jaxbn.batch_norm(jaxbn.BatchNormParams(**params["bn0"]), state[0], x,
                             training=True, momentum=0.9)
    x = jax.nn.relu(x)
    x = x @ params["dense1"]["kernel"] + params["dense1"]["bias"][None]
    x, s1 = jaxbn.batch_norm(jaxbn.BatchNormParams(**params["bn1"]), state[1], x,
                             training=True, momentum=0.9)
    return x, [s0, s1]

  stats = variables["batch_stats"]
  state = [jaxbn.BatchNormState(stats[name]["mean"], stats[name]["var"],
                                jnp.zeros((), jnp.int32)) for name in ("bn0", "bn1")]
  return apply_fn, p, state


def _dense0(variables, x):
  layer = variables["params"]["dense0"]
  return x @ layer["kernel"] + layer["bias"][None]


def _batches(num=3, size=16, features=5, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(2.0, 3.0, (size, features)), jnp.float32)
          for _ in range(num)]


def _trained_linen_variables():
  model = _LinenMLP()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 5)), train=False)
  # A few steps so that the running statistics are not the initial ones.
  for batch in _batches(seed=1):
    _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return model, variables


def test_linen_recompute_stats_matches_core():
  model, variables = _trained_linen_variables()
  batches = _batches(num=4)
  got = jaxbn_linen.recompute_stats(model, variables, batches, train=True)
  apply_fn, params, state = _core_twin(variables)
  want = jaxbn.recompute_stats(apply_fn, params, state, batches)
  for name, layer in zip(("bn0", "bn1"), want):
    chex.assert_trees_all_close(got["batch_stats"][name]["mean"], layer.mean, rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(got["batch_stats"][name]["var"], layer.var, rtol=1e-5)
  chex.assert_trees_all_equal(got["params"], variables["params"])
  # The first layer's input does not depend on BN: its pooled statistics over
  # equal batches are those of all examples together.
  dense0 = _dense0(variables, jnp.concatenate(batches))
  np.testing.assert_allclose(got["batch_stats"]["bn0"]["mean"], dense0.mean(0), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got["batch_stats"]["bn0"]["var"], dense0.var(0), rtol=1e-4)


def test_linen_recompute_stats_ignores_eval_mode_and_num_batches():
  model, variables = _trained_linen_variables()
  batches = _batches(num=4)
  # BN layers record batch statistics even when the model is applied in eval mode.
  in_eval = jaxbn_linen.recompute_stats(model, variables, iter(batches), train=False,
                                        num_batches=2)
  first_two = jaxbn_linen.recompute_stats(model, variables, batches[:2], train=True)
  chex.assert_trees_all_close(in_eval, first_two)
  with pytest.raises(ValueError, match="needs 5 batches, got 4"):
    jaxbn_linen.recompute_stats(model, variables, batches, train=True, num_batches=5)
  with pytest.raises(TypeError, match="num_batches"):
    jaxbn_linen.recompute_stats(model, variables, batches, train=True, num_batches=0)
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    jaxbn_linen.recompute_stats(model, {"params": variables["params"]}, batches,
                                train=True)


def test_running_statistics_are_untouched_outside_recompute():
  model, variables = _trained_linen_variables()
  jaxbn_linen.recompute_stats(model, variables, _batches(), train=True)
  # A normal training step after it still uses momentum 0.9, not the probe's 0.
  batch = _batches(num=1, seed=7)[0]
  _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
  old = variables["batch_stats"]["bn0"]["mean"]
  dense0 = _dense0(variables, batch)
  np.testing.assert_allclose(updates["batch_stats"]["bn0"]["mean"],
                             0.9 * old + 0.1 * dense0.mean(0), rtol=1e-5, atol=1e-6)


class _NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.dense0 = nnx.Linear(5, 6, rngs=rngs)
    self.bn0 = jaxbn_nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
    self.dense1 = nnx.Linear(6, 4, rngs=rngs)
    self.bn1 = jaxbn_nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.bn1(self.dense1(nnx.relu(self.bn0(self.dense0(x)))))


def test_nnx_recompute_stats_matches_core_and_keeps_mode():
  model = _NnxMLP(nnx.Rngs(0))
  for batch in _batches(seed=1):
    model(batch)
  model.eval()
  params_before = nnx.state(model, nnx.Param)
  batches = _batches(num=4)
  layer = lambda m: {"kernel": m.kernel[...], "bias": m.bias[...]}
  bn = lambda m: {"scale": m.scale[...], "bias": m.bias[...]}
  twin_variables = {
      "params": {"dense0": layer(model.dense0), "bn0": bn(model.bn0),
                 "dense1": layer(model.dense1), "bn1": bn(model.bn1)},
      "batch_stats": {name: {"mean": getattr(model, name).mean[...],
                             "var": getattr(model, name).var[...]}
                      for name in ("bn0", "bn1")}}
  apply_fn, params, state = _core_twin(twin_variables)
  want = jaxbn.recompute_stats(apply_fn, params, state, batches)
  jaxbn_nnx.recompute_stats(model, batches)
  for got, layer_state in ((model.bn0, want[0]), (model.bn1, want[1])):
    np.testing.assert_allclose(got.mean[...], layer_state.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var[...], layer_state.var, rtol=1e-5)
  assert model.bn0.use_running_average and model.bn1.use_running_average
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), params_before)


def _random_stats(num_replicas, seed=0):
  rng = np.random.default_rng(seed)

  def stats(shape):
    return {"mean": jnp.asarray(rng.normal(5.0, 1.0, (num_replicas,) + shape), jnp.float32),
            "var": jnp.asarray(rng.uniform(0.5, 2.0, (num_replicas,) + shape), jnp.float32)}

  return {"block": {"bn": stats((3,))}, "head_bn": stats((2,))}


def test_linen_sync_stats_matches_core():
  stacked = _random_stats(8)
  got = jax.vmap(lambda s: jaxbn_linen.sync_stats(s, "replica"), axis_name="replica")(
      stacked)

  def core(stats):
    states = jax.tree.map(
        lambda layer: jaxbn.BatchNormState(layer["mean"], layer["var"], jnp.int32(0)),
        stats, is_leaf=lambda node: isinstance(node, dict) and "mean" in node)
    return jaxbn.sync_stats(states, "replica")

  want = jax.vmap(core, axis_name="replica")(stacked)
  for path in (("block", "bn"), ("head_bn",)):
    g, w = got, want
    for key in path:
      g, w = g[key], w[key]
    chex.assert_trees_all_close(g["mean"], w.mean)
    chex.assert_trees_all_close(g["var"], w.var)
  # Not a plain pmean: the variance of the means is added.
  plain = stacked["head_bn"]["var"].mean(0)
  assert np.all(np.asarray(got["head_bn"]["var"][0]) > np.asarray(plain) + 1e-3)


def test_nnx_sync_stats_on_batch_stat_state():
  model = _NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.BatchStat)
  stacked = jax.tree.map(
      lambda leaf: leaf[None] + jnp.arange(4.0).reshape((4,) + (1,) * leaf.ndim), state)
  synced = jax.vmap(lambda s: jaxbn_nnx.sync_stats(s, "replica"), axis_name="replica")(
      stacked)
  means = np.asarray(stacked["bn0"]["mean"][...])
  np.testing.assert_allclose(synced["bn0"]["mean"][...][0], means.mean(0), rtol=1e-6)
  np.testing.assert_allclose(synced["bn0"]["var"][...][0],
                             np.asarray(stacked["bn0"]["var"][...]).mean(0) + means.var(0),
                             rtol=1e-5)
  nnx.update(model, jax.tree.map(lambda leaf: leaf[0], synced))
  shifts = np.arange(4.0)  # replica i holds mean + i and var + i
  np.testing.assert_allclose(model.bn1.var[...], (1.0 + shifts).mean() + shifts.var(),
                             rtol=1e-5)


def test_sync_stats_errors():
  with pytest.raises(ValueError, match="holds no batch-norm statistics"):
    jaxbn_linen.sync_stats({"params": {"w": jnp.ones(3)}}, "replica")
  with pytest.raises(ValueError, match="needs axis_name"):
    jaxbn_linen.sync_stats(_random_stats(1), None)
