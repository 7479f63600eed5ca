"""Input feature scaling: standardization and min-max scaling as pure functions.

Each scaler is three pure functions over a NamedTuple of per-feature
statistics: `fit_*` (data -> statistics), an apply function and its inverse.
Statistics can also be accumulated over a stream of batches (`init_*`,
`update_*`, `merge_*`) and pooled across replicas under `axis_name`, with the
same conventions as `jaxbn.moments`: `axis` names the feature axis (or axes)
and every other axis is reduced, so `(num_examples, num_features)` data uses
the default `axis=-1`, like `numpy.mean(x, axis=0)`.

Standardization keeps the count-weighted `Moments` (count, mean, biased
variance) so that merging batches or replicas is exact; the degrees-of-freedom
correction is chosen when the statistics are applied (`ddof`, default 0 as in
`sklearn.preprocessing.StandardScaler` and `numpy.std`; `ddof=1` gives the
n - 1 sample standard deviation, as `pandas.DataFrame.std`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _stats
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask


# Standardization keeps exactly batch norm's moments: `count`, `mean` and the
# biased `var` per feature, pooled across batches and replicas by `merge_moments`.
StandardizeStats = _stats.Moments


class MinMaxStats(NamedTuple):
  """Per-feature extremes for min-max scaling.

  Attributes:
    min: per-feature minimum, shape `feature_shape` (+inf if nothing was seen).
    max: per-feature maximum, shape `feature_shape` (-inf if nothing was seen).
  """
  min: jax.Array
  max: jax.Array


def _check_stats(stats, fields, stats_type, x, feature_axes, feature_shape):
  if not isinstance(stats, stats_type):
    name = "StandardizeStats" if stats_type is StandardizeStats else stats_type.__name__
    raise TypeError(f"stats must be a jaxbn.scaling.{name}, got {type(stats).__name__}.")
  _validation.check_feature_shape(stats, feature_shape, tree_name="stats",
                                  field_names=fields, x_shape=x.shape,
                                  feature_axes=feature_axes)


def _safe_scale(scale: jax.Array) -> jax.Array:
  # Like sklearn's _handle_zeros_in_scale: a constant feature is only shifted,
  # never divided by ~0 (which would blow it up or produce NaN).
  tiny = 10 * jnp.finfo(scale.dtype).eps
  return jnp.where(jnp.isfinite(scale) & (scale >= tiny), scale, 1)


# Standardization.


def init_standardize(num_features: int | tuple[int, ...]) -> StandardizeStats:
  """Empty statistics (count 0) to start a streaming fit with `update_standardize`.

  Args:
    num_features: size of the feature axis, or the shape of the feature axes.

  Returns:
    `StandardizeStats` of float32 zeros of shape `feature_shape`.
  """
  zeros = jnp.zeros(_validation.feature_shape_of(num_features), jnp.float32)
  return StandardizeStats(count=zeros, mean=zeros, var=zeros)


def fit_standardize(x: jax.typing.ArrayLike, *, axis: Axis = -1, mask: Mask | None = None,
                    axis_name: AxisName | None = None,
                    axis_index_groups: AxisIndexGroups | None = None) -> StandardizeStats:
  """Per-feature count, mean and biased variance of `x` (one psum across replicas).

  Args:
    x: floating-point data, e.g. `(num_examples, num_features)`.
    axis: feature axis or axes; every other axis is reduced.
    mask: optional boolean array broadcastable to `x`; only True elements count.
    axis_name: mapped axis name(s) (vmap / shard_map) to pool statistics over.
    axis_index_groups: optional equal-size partition of the replicas.

  Returns:
    `StandardizeStats` of shape `feature_shape`, float32 (float64 for float64
    input).

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[3000.0, 60.0], [3400.0, 70.0], [2600.0, 80.0]])
    >>> stats = jaxbn.scaling.fit_standardize(x)
    >>> stats.mean.tolist(), stats.count.tolist()
    ([3000.0, 70.0], [3.0, 3.0])
  """
  return _stats.moments(x, axis=axis, mask=mask, axis_name=axis_name,
                        axis_index_groups=axis_index_groups)


# Exact count-weighted pooling of two fits (order does not matter).
merge_standardize = _stats.merge_moments


def update_standardize(stats: StandardizeStats, x: jax.typing.ArrayLike, *, axis: Axis = -1,
                       mask: Mask | None = None, axis_name: AxisName | None = None,
                       axis_index_groups: AxisIndexGroups | None = None) -> StandardizeStats:
  """Folds one more batch `x` into streaming statistics.

  Args:
    stats: statistics so far (from `init_standardize` or an earlier fit).
    x: the new batch; same conventions as `fit_standardize`.
    axis: feature axis or axes of `x`.
    mask: optional boolean array broadcastable to `x`.
    axis_name: mapped axis name(s) to pool the new batch over.
    axis_index_groups: optional equal-size partition of the replicas.

  Returns:
    The statistics of all data seen so far, as one fit on their concatenation
    would give.
  """
  x, feature_axes, reduction_axes, feature_shape = _validation.parse_input(x, axis)
  _check_stats(stats, ("count", "mean", "var"), StandardizeStats, x, feature_axes,
               feature_shape)
  # Shifting by the running mean keeps the one-pass variance accurate for data
  # far from zero; it is replicated, so it is also valid under axis_name.
  if axis_name is None:
    first_fit = _stats.first_element(x, reduction_axes).astype(stats.mean.dtype)
  else:
    first_fit = jnp.zeros_like(stats.mean)
  shift = jnp.where(stats.count > 0, stats.mean, first_fit)
  batch = _stats.moments(x, axis=axis, mask=mask, shift=shift, axis_name=axis_name,
                         axis_index_groups=axis_index_groups)
  return _stats.merge_moments(stats, batch)


def _mean_and_std(stats: StandardizeStats, ddof, compute_dtype):
  if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
    raise ValueError(f"ddof must be a non-negative int, got {ddof!r}.")
  count = stats.count.astype(compute_dtype)
  var = stats.var.astype(compute_dtype)
  if ddof:
    var = jnp.where(count > ddof, var * count / jnp.maximum(count - ddof, 1), 0)
  return stats.mean.astype(compute_dtype), _safe_scale(jnp.sqrt(var))


def standardize(stats: StandardizeStats, x: jax.typing.ArrayLike, *, axis: Axis = -1,
                ddof: int = 0) -> jax.Array:
  """`(x - mean) / std` per feature.

  Args:
    stats: fitted `StandardizeStats` of shape `feature_shape`.
    x: floating-point data whose feature axes (`axis`) have `feature_shape`.
    axis: feature axis or axes of `x`.
    ddof: delta degrees of freedom of the standard deviation: 0 (default,
      sklearn's StandardScaler, numpy.std) or 1 (the n - 1 sample std).
      Features whose std is below `10 * finfo(dtype).eps` or undefined (count
      <= ddof) are only centered, as in sklearn.

  Returns:
    Array of `x`'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 10.0], [3.0, 10.0]])
    >>> stats = jaxbn.scaling.fit_standardize(x)
    >>> jaxbn.scaling.standardize(stats, x).tolist()  # the constant column is only centered
    [[-1.0, 0.0], [1.0, 0.0]]
    >>> jaxbn.scaling.unstandardize(stats, jaxbn.scaling.standardize(stats, x)).tolist()
    [[1.0, 10.0], [3.0, 10.0]]
  """
  x, feature_axes, _, feature_shape = _validation.parse_input(x, axis)
  _check_stats(stats, ("count", "mean", "var"), StandardizeStats, x, feature_axes,
               feature_shape)
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  mean, std = _mean_and_std(stats, ddof, compute_dtype)
  shape = _stats.feature_broadcast_shape(x.shape, feature_axes)
  y = (x.astype(compute_dtype) - mean.reshape(shape)) / std.reshape(shape)
  return y.astype(x.dtype)


def unstandardize(stats: StandardizeStats, y: jax.typing.ArrayLike, *, axis: Axis = -1,
                  ddof: int = 0) -> jax.Array:
  """Inverse of `standardize`: `y * std + mean` per feature (same arguments)."""
  y, feature_axes, _, feature_shape = _validation.parse_input(y, axis)
  _check_stats(stats, ("count", "mean", "var"), StandardizeStats, y, feature_axes,
               feature_shape)
  compute_dtype = jnp.promote_types(y.dtype, jnp.float32)
  mean, std = _mean_and_std(stats, ddof, compute_dtype)
  shape = _stats.feature_broadcast_shape(y.shape, feature_axes)
  x = y.astype(compute_dtype) * std.reshape(shape) + mean.reshape(shape)
  return x.astype(y.dtype)


# Min-max scaling.


def init_min_max(num_features: int | tuple[int, ...]) -> MinMaxStats:
  """Empty statistics (min=+inf, max=-inf) to start a streaming fit."""
  shape = _validation.feature_shape_of(num_features)
  return MinMaxStats(min=jnp.full(shape, jnp.inf, jnp.float32),
                     max=jnp.full(shape, -jnp.inf, jnp.float32))


def fit_min_max(x: jax.typing.ArrayLike, *, axis: Axis = -1, mask: Mask | None = None,
                axis_name: AxisName | None = None, axis_index_groups: AxisIndexGroups | None = None
               ) -> MinMaxStats:
  """Per-feature minimum and maximum of `x` (one pmax across replicas).

  Args:
    x: floating-point data, e.g. `(num_examples, num_features)`.
    axis: feature axis or axes; every other axis is reduced.
    mask: optional boolean array broadcastable to `x`; only True elements count.
    axis_name: mapped axis name(s) (vmap / shard_map) to pool over.
    axis_index_groups: optional equal-size partition of the replicas.

  Returns:
    `MinMaxStats` of shape `feature_shape` in float32 (float64 for float64
    input); features without a valid element have min=+inf, max=-inf.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> bounds = jaxbn.scaling.fit_min_max(jnp.array([[0.0, -5.0], [10.0, 5.0], [5.0, 0.0]]))
    >>> bounds.min.tolist(), bounds.max.tolist()
    ([0.0, -5.0], [10.0, 5.0])
  """
  x, _, reduction_axes, _ = _validation.parse_input(x, axis)
  names = _validation.normalize_axis_name(axis_name)
  groups = _validation.normalize_axis_index_groups(axis_index_groups, names)
  _validation.check_axis_names_bound(names)
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(compute_dtype)
  if mask is None:
    low, high = jnp.min(x, reduction_axes), jnp.max(x, reduction_axes)
  else:
    mask = _validation.broadcast_mask(mask, x.shape)
    low = jnp.min(jnp.where(mask, x, jnp.inf), reduction_axes)
    high = jnp.max(jnp.where(mask, x, -jnp.inf), reduction_axes)
  # min = -max(-x): both extremes travel in one collective.
  extremes = _stats.cross_replica_max(jnp.stack([-low, high]), names, groups)
  return MinMaxStats(min=-extremes[0], max=extremes[1])


def merge_min_max(a: MinMaxStats, b: MinMaxStats) -> MinMaxStats:
  """Pools two fits: the elementwise min of minima and max of maxima."""
  return MinMaxStats(min=jnp.minimum(a.min, b.min), max=jnp.maximum(a.max, b.max))


def update_min_max(stats: MinMaxStats, x: jax.typing.ArrayLike, *, axis: Axis = -1,
                   mask: Mask | None = None, axis_name: AxisName | None = None,
                   axis_index_groups: AxisIndexGroups | None = None) -> MinMaxStats:
  """Folds one more batch `x` into streaming min-max statistics."""
  x, feature_axes, _, feature_shape = _validation.parse_input(x, axis)
  _check_stats(stats, ("min", "max"), MinMaxStats, x, feature_axes, feature_shape)
  return merge_min_max(stats, fit_min_max(x, axis=axis, mask=mask, axis_name=axis_name,
                                          axis_index_groups=axis_index_groups))


def _offset_and_range(stats: MinMaxStats, feature_range, compute_dtype):
  try:
    low, high = (float(v) for v in feature_range)
  except (TypeError, ValueError):
    raise ValueError(
        f"feature_range must be a pair of floats (low, high), got {feature_range!r}."
    ) from None
  if not low < high:
    raise ValueError(f"feature_range must have low < high, got {feature_range!r}.")
  data_min = stats.min.astype(compute_dtype)
  seen = jnp.isfinite(data_min) & jnp.isfinite(stats.max)
  data_min = jnp.where(seen, data_min, 0)
  data_range = _safe_scale(jnp.where(seen, stats.max.astype(compute_dtype) - data_min, 1))
  return data_min, data_range, low, high


def min_max_scale(stats: MinMaxStats, x: jax.typing.ArrayLike, *, axis: Axis = -1,
                  feature_range=(0.0, 1.0)) -> jax.Array:
  """`low + (x - min) / (max - min) * (high - low)` per feature.

  Args:
    stats: fitted `MinMaxStats` of shape `feature_shape`.
    x: floating-point data whose feature axes (`axis`) have `feature_shape`.
    axis: feature axis or axes of `x`.
    feature_range: `(low, high)` target interval of the fitted data, default
      `(0, 1)` as in sklearn's MinMaxScaler. Constant features
      (range below `10 * finfo(dtype).eps`) are only shifted, to `low`.

  Returns:
    Array of `x`'s shape and dtype.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[0.0, -5.0], [10.0, 5.0], [5.0, 0.0]])
    >>> bounds = jaxbn.scaling.fit_min_max(x)
    >>> jaxbn.scaling.min_max_scale(bounds, x).tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]
    >>> jaxbn.scaling.min_max_scale(bounds, x, feature_range=(-1, 1))[2].tolist()
    [0.0, 0.0]
  """
  x, feature_axes, _, feature_shape = _validation.parse_input(x, axis)
  _check_stats(stats, ("min", "max"), MinMaxStats, x, feature_axes, feature_shape)
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  data_min, data_range, low, high = _offset_and_range(stats, feature_range, compute_dtype)
  shape = _stats.feature_broadcast_shape(x.shape, feature_axes)
  unit = (x.astype(compute_dtype) - data_min.reshape(shape)) / data_range.reshape(shape)
  return (low + unit * (high - low)).astype(x.dtype)


def min_max_unscale(stats: MinMaxStats, y: jax.typing.ArrayLike, *, axis: Axis = -1,
                    feature_range=(0.0, 1.0)) -> jax.Array:
  """Inverse of `min_max_scale` (same arguments)."""
  y, feature_axes, _, feature_shape = _validation.parse_input(y, axis)
  _check_stats(stats, ("min", "max"), MinMaxStats, y, feature_axes, feature_shape)
  compute_dtype = jnp.promote_types(y.dtype, jnp.float32)
  data_min, data_range, low, high = _offset_and_range(stats, feature_range, compute_dtype)
  shape = _stats.feature_broadcast_shape(y.shape, feature_axes)
  unit = (y.astype(compute_dtype) - low) / (high - low)
  return (unit * data_range.reshape(shape) + data_min.reshape(shape)).astype(y.dtype)
