"""Masks: garbage in masked-out slots, and features with no valid element.

Padding is where NaN and inf live. Whatever a masked-out slot holds, the valid
outputs, the statistics, the state and the gradients (of the valid elements
and of the parameters, for a loss that ignores masked-out outputs) must be
those computed without the masked-out elements. A feature whose every element
is masked out is normalized with the running statistics, which do not change.
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

GARBAGE = [np.nan, np.inf, -np.inf, 1e38]
VALID_ROWS = 4  # of 6; rows 4 and 5 are masked out


_data = functools.partial(helpers.normal, loc=1.5, scale=2.0)


def _close(actual, expected):
  chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-6)


def _params(features, seed=1):
  scale = 1.0 + 0.5 * _data((features,), seed)
  return jaxbn.BatchNormParams(scale=scale, bias=_data((features,), seed + 1))


def _warm_state(features):
  # count > 0: the shift is the (debiased, here ~unchanged) running mean, not
  # a pass over the batch.
  return jaxbn.BatchNormState(mean=_data((features,), 7),
                              var=1.0 + _data((features,), 8) ** 2,
                              count=jnp.asarray(1000, jnp.int32))


_ROW_MASK = jnp.arange(6)[:, None] < VALID_ROWS


def _with_garbage(x, rows=slice(VALID_ROWS, None)):
  """`x` with each GARBAGE value in turn in `rows`."""
  return [x.at[rows].set(value) for value in GARBAGE]


def _valid_rows_and_gradients(fn, params, state, x, mask):
  """`fn(params, state, x, mask)`'s valid outputs, state, dparams and dx."""
  weights = _data(x.shape, seed=9)

  def loss(params, x):
    y, new_state = fn(params, state, x, mask)
    y = y if mask is None else jnp.where(mask, y, 0)  # ignore masked-out outputs
    return jnp.sum(y * weights), (y, new_state)

  (_, (y, new_state)), (dparams, dx) = jax.value_and_grad(
      loss, (0, 1), has_aux=True)(params, x)
  return y, new_state, dparams, dx


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm"])
def test_garbage_in_masked_rows_changes_nothing(name, warm):
  functions = {
      "batch_norm": lambda p, s, x, m: jaxbn.batch_norm(p, s, x, training=True, mask=m),
      "batch_renorm": lambda p, s, x, m: jaxbn.batch_renorm(
          p, s, x, training=True, mask=m, r_max=1.5, d_max=0.5)}
  params, state = _params(3), _warm_state(3) if warm else jaxbn.init(3)[1]
  x = _data((6, 3))
  run = jax.jit(lambda x, mask: _valid_rows_and_gradients(functions[name], params,
                                                          state, x, mask))
  y, new_state, dparams, dx = run(x[:VALID_ROWS], None)
  for dirty in _with_garbage(x):
    y_masked, state_masked, dparams_masked, dx_masked = run(dirty, _ROW_MASK)
    _close((y_masked[:VALID_ROWS], state_masked, dparams_masked, dx_masked[:VALID_ROWS]),
           (y, new_state, dparams, dx))
    np.testing.assert_array_equal(dx_masked[VALID_ROWS:], 0.0)
    assert state_masked.count == state.count + 1


def test_garbage_in_an_elementwise_mask_changes_nothing():
  """Per-feature valid counts; the reference holds 0 where the garbage was."""
  x = _data((6, 3))
  mask = jnp.asarray(np.random.default_rng(3).random((6, 3)) < 0.6).at[:2].set(True)
  params, state = _params(3), _warm_state(3)
  weights = _data((6, 3), seed=9)

  def loss(params, x):
    y, new_state = jaxbn.batch_norm(params, state, x, training=True, mask=mask)
    y = jnp.where(mask, y, 0)
    return jnp.sum(y * weights), (y, new_state)

  grad = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
  clean = grad(params, jnp.where(mask, x, 0.0))
  for value in GARBAGE:
    _close(grad(params, jnp.where(mask, x, value)), clean)


def test_ghost_batch_norm_ignores_garbage():
  # Two ghost batches of 4; the second has 2 masked-out rows.
  x = _data((8, 3))
  mask = (jnp.arange(8) < 6)[:, None]
  params, state = _params(3), _warm_state(3)
  weights = _data((8, 3), seed=9)

  def loss(params, x):
    y, new_state = jaxbn.ghost_batch_norm(params, state, x, training=True,
                                          virtual_batch_size=4, mask=mask)
    y = jnp.where(mask, y, 0)
    return jnp.sum(y * weights), (y, new_state)

  grad = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
  clean = grad(params, x.at[6:].set(0.0))
  for dirty in _with_garbage(x, slice(6, None)):
    _close(grad(params, dirty), clean)
  # The first ghost batch is plain batch norm of its 4 rows.
  y_first, _ = jaxbn.batch_norm(params, state, x[:4], training=True)
  _close(clean[1][0][:4], y_first)


def test_moments_ignore_garbage():
  x = _data((6, 3))
  coefficients = _data((2, 3), seed=4)

  def stats(x, mask):
    moments = jaxbn.moments(x, mask=mask)
    return jnp.sum(coefficients[0] * moments.mean + coefficients[1] * moments.var), moments

  run = jax.jit(jax.grad(stats, has_aux=True))
  dx_clean, clean = run(x[:VALID_ROWS], None)
  for dirty in _with_garbage(x):
    dx, garbage = run(dirty, _ROW_MASK)
    _close((garbage.mean, garbage.var, dx[:VALID_ROWS]), (clean.mean, clean.var, dx_clean))
    np.testing.assert_array_equal(dx[VALID_ROWS:], 0.0)


def test_recompute_stats_ignores_garbage():
  params, state = _params(3), _warm_state(3)

  def apply_fn(params, state, batch):
    x, mask = batch
    return jaxbn.batch_norm(params, state, x, training=True, mask=mask)

  batches = [_data((6, 3), seed=s) for s in range(3)]
  clean = jaxbn.recompute_stats(apply_fn, params, state,
                                [(b[:VALID_ROWS], None) for b in batches])
  for value in GARBAGE:
    garbage = jaxbn.recompute_stats(
        apply_fn, params, state,
        [(b.at[VALID_ROWS:].set(value), _ROW_MASK) for b in batches])
    _close(garbage, clean)


def test_flax_gradients_are_nan_where_the_adapter_is_exact():
  """The docs/comparison.md's table: flax's masked-garbage gradients are NaN."""
  x = _data((6, 3)).at[VALID_ROWS:].set(jnp.nan)
  results = []
  for norm in (nn.BatchNorm, jaxbn_linen.BatchNorm):
    bn = norm(use_running_average=False, use_fast_variance=False)
    variables = bn.init(jax.random.key(0), x, mask=_ROW_MASK)

    def loss(params, x, bn=bn, variables=variables):
      y, _ = bn.apply({**variables, "params": params}, x, mask=_ROW_MASK,
                      mutable=["batch_stats"])
      return jnp.sum(jnp.where(_ROW_MASK, y, 0) * _data((6, 3), seed=9))

    results.append(jax.jit(jax.grad(loss, (0, 1)))(variables["params"], x))
  (flax_params, flax_dx), (params, dx) = results
  assert np.all(np.isnan(flax_params["scale"])) and np.all(np.isnan(flax_dx[:VALID_ROWS]))
  assert np.all(np.isfinite(params["scale"])) and np.all(np.isfinite(dx))


# ---------------------------------------------------------------- the adapters


def _linen_run(x, mask, variables):
  bn = jaxbn_linen.BatchNorm(use_running_average=False, momentum=0.8)
  weights = _data(x.shape, seed=9)

  def loss(params, x):
    y, updates = bn.apply({**variables, "params": params}, x, mask=mask,
                          mutable=["batch_stats"])
    y = y if mask is None else jnp.where(mask, y, 0)
    return jnp.sum(y * weights), (y, updates)

  return jax.grad(loss, (0, 1), has_aux=True)(variables["params"], x)


def _nnx_run(x, mask):
  bn = jaxbn_nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
  weights = _data(x.shape, seed=9)

  def loss(bn, x):
    y = bn(x, mask=mask)
    y = y if mask is None else jnp.where(mask, y, 0)
    return jnp.sum(y * weights), y

  (grads, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
  return y, nnx.to_pure_dict(grads), dx, nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))


def test_adapters_ignore_garbage():
  x = _data((6, 3))
  variables = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  linen = jax.jit(lambda x, mask: _linen_run(x, mask, variables))
  nnx_run = jax.jit(_nnx_run)
  init = jax.jit(lambda x, mask: jaxbn_linen.BatchNorm(
      use_running_average=False).init_with_output(jax.random.key(0), x, mask=mask)[0])
  (dparams_clean, dx_clean), (y_clean, updates_clean) = linen(x[:VALID_ROWS], None)
  nnx_clean = nnx_run(x[:VALID_ROWS], None)
  y_init_clean = init(x[:VALID_ROWS], None)
  for dirty in _with_garbage(x):
    (dparams, dx), (y, updates) = linen(dirty, _ROW_MASK)
    _close((y[:VALID_ROWS], updates, dparams, dx[:VALID_ROWS]),
           (y_clean, updates_clean, dparams_clean, dx_clean))
    np.testing.assert_array_equal(dx[VALID_ROWS:], 0.0)

    y, grads, dx, stats = nnx_run(dirty, _ROW_MASK)
    _close((y[:VALID_ROWS], grads, dx[:VALID_ROWS], stats),
           (nnx_clean[0], nnx_clean[1], nnx_clean[2], nnx_clean[3]))
    # The init pass (batch statistics, no update) ignores garbage too.
    _close(init(dirty, _ROW_MASK)[:VALID_ROWS], y_init_clean)


# ------------------------------------------------- features with no valid element


# Feature 1 has no valid element; feature 0 has rows 0-3.
_EMPTY_FEATURE_MASK = jnp.stack([jnp.arange(6) < VALID_ROWS, jnp.zeros(6, bool)], axis=1)


def _empty_feature_case(fn, x):
  """y, new state and gradients of `fn` with feature 1 fully masked out."""
  weights = _data(x.shape, seed=9)

  def loss(params, x):
    y, new_state = fn(params, x)
    return jnp.sum(y * weights), (y, new_state)

  return jax.jit(jax.grad(loss, (0, 1), has_aux=True))


def test_a_feature_without_valid_elements_in_training_equals_inference():
  """y, state and gradients of feature 1: those of inference mode."""
  x = _data((6, 2))
  params, state = _params(2), _warm_state(2)
  mask = _EMPTY_FEATURE_MASK
  for fn in (
      lambda p, x, **k: jaxbn.batch_norm(p, state, x, **k),
      lambda p, x, **k: jaxbn.batch_renorm(p, state, x, r_max=1.5, d_max=0.5, **k),
      lambda p, x, **k: jaxbn.ghost_batch_norm(p, state, x, virtual_batch_size=3, **k)):
    (dparams, dx), (y, new_state) = _empty_feature_case(
        lambda p, x: fn(p, x, training=True, mask=mask), x)(params, x)
    (dparams_eval, dx_eval), (y_eval, _) = _empty_feature_case(
        lambda p, x: fn(p, x, training=False), x)(params, x)
    _close((y[:, 1], dx[:, 1], dparams.scale[1], dparams.bias[1]),
           (y_eval[:, 1], dx_eval[:, 1], dparams_eval.scale[1], dparams_eval.bias[1]))
    assert new_state.mean[1] == state.mean[1] and new_state.var[1] == state.var[1]
    assert new_state.mean[0] != state.mean[0]


def test_adapters_agree_with_the_core_on_a_feature_without_valid_elements():
  x = _data((6, 2))
  mask = _EMPTY_FEATURE_MASK
  bn = jaxbn_linen.BatchNorm(use_running_average=False, momentum=0.8)
  variables = bn.init(jax.random.key(0), x, mask=mask)
  stats = variables["batch_stats"]
  stats = {"mean": stats["mean"] + _data((2,), 7), "var": stats["var"] + 0.5}
  y, updates = bn.apply({**variables, "batch_stats": stats}, x, mask=mask,
                        mutable=["batch_stats"])
  core_state = jaxbn.BatchNormState(stats["mean"], stats["var"], jnp.zeros((), jnp.int32))
  params = jaxbn.BatchNormParams(**variables["params"])
  y_core, state_core = jaxbn.batch_norm(params, core_state, x, training=True, mask=mask,
                                        momentum=0.8)
  _close((y, updates["batch_stats"]), (y_core, {"mean": state_core.mean,
                                                "var": state_core.var}))
  y_eval = jaxbn_linen.BatchNorm(use_running_average=True).apply(
      {**variables, "batch_stats": stats}, x)
  _close(y[:, 1], y_eval[:, 1])
  assert updates["batch_stats"]["var"][1] == stats["var"][1]
  y_first_init = bn.init_with_output(jax.random.key(0), x, mask=mask)[0]
  # The init pass normalizes feature 1 with the initial statistics (0, 1).
  _close(y_first_init[:, 1], x[:, 1] / jnp.sqrt(1.0 + 1e-5))

  nnx_bn = jaxbn_nnx.BatchNorm(2, momentum=0.8, rngs=nnx.Rngs(0))
  nnx_bn.mean[...], nnx_bn.var[...] = stats["mean"], stats["var"]
  _close(nnx_bn(x, mask=mask), y_core)
  _close((nnx_bn.mean[...], nnx_bn.var[...]), (state_core.mean, state_core.var))


def test_moments_and_recompute_stats_of_a_feature_without_valid_elements():
  x = _data((6, 2))
  moments = jaxbn.moments(x.at[:, 1].set(jnp.nan), mask=_EMPTY_FEATURE_MASK)
  assert moments.count[1] == 0 and moments.var[1] == 0
  assert np.all(np.isfinite(moments.mean))

  params, state = _params(2), _warm_state(2)

  def apply_fn(params, state, batch):
    x, mask = batch
    return jaxbn.batch_norm(params, state, x, training=True, mask=mask)

  everything = jnp.ones((6, 2), bool)
  first, second = _data((6, 2), seed=1), _data((6, 2), seed=2)
  # Feature 1 is empty in the first batch: it is pooled from the second only.
  pooled = jaxbn.recompute_stats(apply_fn, params, state,
                                 [(first, _EMPTY_FEATURE_MASK), (second, everything)])
  only_second = jaxbn.recompute_stats(apply_fn, params, state, [(second, everything)])
  _close((pooled.mean[1], pooled.var[1]), (only_second.mean[1], only_second.var[1]))
  # Empty in every batch: the feature keeps its statistics.
  kept = jaxbn.recompute_stats(apply_fn, params, state, [(first, _EMPTY_FEATURE_MASK)])
  assert kept.mean[1] == state.mean[1] and kept.var[1] == state.var[1]
  assert kept.mean[0] != state.mean[0]
