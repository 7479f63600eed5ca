"""jaxbn.scaling (standardize, min_max_scale) against numpy references.

The references are the feature-scaling note's numpy code (`numpy.mean/std/min/max(x, axis=0)`)
and sklearn's documented behaviour (StandardScaler: ddof=0, zero-variance
features only centered; MinMaxScaler: feature_range, constant features -> low).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def _income_height(n=1000, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([rng.normal(3000, 400, n), rng.normal(69, 3, n)], 1).astype(np.float32)


@pytest.mark.parametrize("ddof", [0, 1])
def test_standardize_matches_numpy(ddof):
  x = _income_height()
  stats = jaxbn.scaling.fit_standardize(x)
  y = jaxbn.scaling.standardize(stats, x, ddof=ddof)
  expected = (x - x.mean(0, dtype=np.float64)) / x.std(0, ddof=ddof, dtype=np.float64)
  np.testing.assert_allclose(y, expected, atol=1e-4)
  np.testing.assert_allclose(stats.count, [1000, 1000])
  np.testing.assert_allclose(jaxbn.scaling.unstandardize(stats, y, ddof=ddof), x, rtol=1e-6)


def test_standardize_float64_exact():
  with jax.enable_x64(True):
    x = _income_height().astype(np.float64)
    y = jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(x), x)
    np.testing.assert_allclose(y, (x - x.mean(0)) / x.std(0), rtol=1e-12, atol=1e-12)
    assert y.dtype == jnp.float64


def test_standardize_nhwc_per_channel_axis():
  x = np.random.default_rng(1).normal(5, 2, (4, 3, 3, 2)).astype(np.float32)
  y = jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(x, axis=-1), x, axis=-1)
  expected = (x - x.mean((0, 1, 2))) / x.std((0, 1, 2))
  np.testing.assert_allclose(y, expected, atol=1e-5)
  # NCHW: the feature axis is 1.
  x_nchw = np.moveaxis(x, -1, 1)
  y_nchw = jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(x_nchw, axis=1), x_nchw, axis=1)
  np.testing.assert_allclose(y_nchw, np.moveaxis(expected, -1, 1), atol=1e-5)


def test_streaming_standardize_equals_one_fit():
  x = _income_height(n=300)
  stats = jaxbn.scaling.init_standardize(2)
  for batch in np.split(x, [7, 100, 101, 300]):
    if len(batch):
      stats = jaxbn.scaling.update_standardize(stats, batch)
  full = jaxbn.scaling.fit_standardize(x)
  np.testing.assert_allclose(stats.count, full.count)
  np.testing.assert_allclose(stats.mean, x.mean(0, dtype=np.float64), rtol=1e-6)
  np.testing.assert_allclose(stats.var, x.var(0, dtype=np.float64), rtol=1e-4)
  merged = jaxbn.scaling.merge_standardize(jaxbn.scaling.fit_standardize(x[:50]),
                                   jaxbn.scaling.fit_standardize(x[50:]))
  np.testing.assert_allclose(merged.var, x.var(0, dtype=np.float64), rtol=1e-4)
  assert isinstance(merged, jaxbn.scaling.StandardizeStats)


def test_standardize_mask_counts_only_valid_rows():
  x = _income_height(n=64)
  valid = np.arange(64) % 3 != 0
  stats = jaxbn.scaling.fit_standardize(x, mask=valid[:, None])
  np.testing.assert_allclose(stats.count, [valid.sum()] * 2)
  np.testing.assert_allclose(stats.mean, x[valid].mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.var, x[valid].var(0), rtol=1e-4)


def test_cross_replica_fit_is_count_weighted(mesh8):
  # Unequal valid counts per replica: pooled stats must equal the global ones.
  x = _income_height(n=64).reshape(8, 8, 2)
  valid = np.arange(64).reshape(8, 8) < np.arange(1, 9)[:, None]

  fit = jax.vmap(functools.partial(jaxbn.scaling.fit_standardize, axis_name="r"),
                 axis_name="r")
  stats = fit(x, mask=valid[..., None])
  flat = x[valid]
  np.testing.assert_allclose(stats.count[0], [flat.shape[0]] * 2)
  np.testing.assert_allclose(stats.mean[3], flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats.var[5], flat.var(0), rtol=1e-3)

  minmax = jax.vmap(lambda v, m: jaxbn.scaling.fit_min_max(v, mask=m, axis_name="r"),
                    axis_name="r")(x, valid[..., None])
  np.testing.assert_array_equal(minmax.min[7], flat.min(0))
  np.testing.assert_array_equal(minmax.max[0], flat.max(0))

  # shard_map over a real 8-device mesh, with two groups of four replicas.
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  spec = jax.P("data")
  grouped = jax.shard_map(
      lambda v: jax.tree.map(lambda a: a[None], jaxbn.scaling.fit_min_max(
          v[0], axis_name="data", axis_index_groups=groups)),
      mesh=mesh8, in_specs=spec, out_specs=spec)(
          jax.device_put(x, jax.NamedSharding(mesh8, spec)))
  grouped = jax.tree.map(np.asarray, grouped)
  np.testing.assert_array_equal(grouped.max[1], x[:4].reshape(-1, 2).max(0))
  np.testing.assert_array_equal(grouped.min[6], x[4:].reshape(-1, 2).min(0))


def test_min_max_matches_seed_code_and_inverts():
  x = _income_height()
  stats = jaxbn.scaling.fit_min_max(x)
  y = jaxbn.scaling.min_max_scale(stats, x)
  expected = (x - x.min(0)) / (x.max(0) - x.min(0))
  np.testing.assert_allclose(y, expected, atol=1e-6)
  assert float(jnp.min(y)) == 0.0 and float(jnp.max(y)) == 1.0
  np.testing.assert_allclose(jaxbn.scaling.min_max_unscale(stats, y), x, rtol=1e-6)
  y2 = jaxbn.scaling.min_max_scale(stats, x, feature_range=(-1, 1))
  np.testing.assert_allclose(y2, 2 * expected - 1, atol=1e-6)
  np.testing.assert_allclose(
      jaxbn.scaling.min_max_unscale(stats, y2, feature_range=(-1, 1)), x, rtol=1e-6)


def test_streaming_min_max_equals_one_fit():
  x = _income_height(n=100)
  stats = jaxbn.scaling.init_min_max(2)
  for batch in np.split(x, 4):
    stats = jaxbn.scaling.update_min_max(stats, batch)
  np.testing.assert_array_equal(stats.min, x.min(0))
  np.testing.assert_array_equal(stats.max, x.max(0))


def test_constant_and_unseen_features_never_give_nan():
  x = np.stack([np.full(5, 7.0), np.arange(5.0)], 1).astype(np.float32)
  y = jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(x), x)
  np.testing.assert_allclose(y[:, 0], 0.0)  # sklearn: constant features are only centered
  m = jaxbn.scaling.min_max_scale(jaxbn.scaling.fit_min_max(x), x)
  np.testing.assert_allclose(m[:, 0], 0.0)
  np.testing.assert_allclose(m[:, 1], np.arange(5) / 4)
  # Nothing fitted yet / one sample with ddof=1: finite output.
  for out in (jaxbn.scaling.standardize(jaxbn.scaling.init_standardize(2), x),
              jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(x[:1]), x, ddof=1),
              jaxbn.scaling.min_max_scale(jaxbn.scaling.init_min_max(2), x),
              jaxbn.scaling.min_max_unscale(jaxbn.scaling.init_min_max(2), x)):
    assert np.all(np.isfinite(out))


def test_works_under_jit_and_keeps_dtype():
  x = jnp.asarray(_income_height(n=32), jnp.bfloat16)
  fit_apply = jax.jit(lambda v: jaxbn.scaling.standardize(jaxbn.scaling.fit_standardize(v), v))
  y = fit_apply(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32).std(0), [1, 1], atol=0.02)


def test_bad_arguments_raise_clear_errors():
  x = _income_height(n=8)
  stats = jaxbn.scaling.fit_standardize(x)
  with pytest.raises(TypeError, match="floating-point"):
    jaxbn.scaling.fit_standardize(np.arange(6).reshape(3, 2))
  with pytest.raises(ValueError, match=r"stats\.count has shape \(2,\)"):
    jaxbn.scaling.standardize(stats, np.ones((4, 3), np.float32))
  with pytest.raises(ValueError, match="ddof"):
    jaxbn.scaling.standardize(stats, x, ddof=-1)
  with pytest.raises(TypeError, match="StandardizeStats"):
    jaxbn.scaling.standardize(jaxbn.scaling.fit_min_max(x), x)
  with pytest.raises(ValueError, match="feature_range"):
    jaxbn.scaling.min_max_scale(jaxbn.scaling.fit_min_max(x), x, feature_range=(1, 0))
  with pytest.raises(ValueError, match="num_features"):
    jaxbn.scaling.init_standardize(0)
  with pytest.raises(ValueError, match="axis"):
    jaxbn.scaling.fit_min_max(x, axis=2)
