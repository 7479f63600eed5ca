"""Per-feature moments, the one cross-replica reduction, and running averages.

All statistics here are *count-weighted*: replicas (or batches) that contribute
more valid elements weigh more, so pooled results equal what a single device
would compute on the concatenated valid elements. Cross-replica statistics use
exactly one sum-reduction (psum) whose payload is independent of the number of
replicas.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _validation


class Moments(NamedTuple):
  """Count-weighted per-feature statistics.

  Attributes:
    count: number of valid elements that went into each feature's statistics;
      shape `feature_shape` (or `()` when it is the same for all features).
    mean: per-feature mean, shape `feature_shape`.
    var: per-feature biased (population) variance, shape `feature_shape`.
  """
  count: jax.Array
  mean: jax.Array
  var: jax.Array


def replica_count(axis_name: tuple | None, axis_index_groups) -> int:
  """Number of replicas whose data enters one statistic (static)."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return int(lax.axis_size(axis_name))


def _varying_axes(value) -> frozenset:
  """Mesh axes over which `value` varies under shard_map(check_vma=True)."""
  aval = jax.typeof(value)
  vma = getattr(aval, "vma", None)
  if vma is None:
    manual = getattr(aval, "manual_axis_type", None)
    vma = getattr(manual, "varying", frozenset()) if manual is not None else frozenset()
  return frozenset(vma)


def cross_replica_sum(value: jax.Array, axis_name: tuple | None,
                      axis_index_groups=None) -> jax.Array:
  """Sums `value` over the named mapped axes (or replica groups) in one collective.

  Args:
    value: any array; summed elementwise over replicas.
    axis_name: tuple of mapped axis names, or None for no reduction.
    axis_index_groups: optional partition of replicas into equal groups; each
      replica receives the sum over its own group.

  Returns:
    An array of `value`'s shape and dtype.
  """
  if axis_name is None:
    return value
  if axis_index_groups is None:
    return lax.psum(value, axis_name)
  try:
    return lax.psum(value, axis_name, axis_index_groups=axis_index_groups)
  except NotImplementedError:
    # vmap and shard_map(check_vma=True) have no grouped all-reduce. Sum a
    # (num_groups, ...) one-hot layout instead: still one collective, with a
    # payload that grows with the number of groups (not of replicas).
    num_replicas = sum(len(g) for g in axis_index_groups)
    group_of = np.zeros(num_replicas, np.int32)
    for group_id, members in enumerate(axis_index_groups):
      group_of[list(members)] = group_id
    my_group = jnp.asarray(group_of)[lax.axis_index(axis_name)]
    one_hot = jax.nn.one_hot(my_group, len(axis_index_groups), dtype=value.dtype)
    slots = one_hot.reshape((-1,) + (1,) * value.ndim) * value[None]
    return lax.psum(slots, axis_name)[my_group]


def replicated_sum(local: jax.Array, reduced: jax.Array, like: jax.Array,
                   axis_name: tuple | None, axis_index_groups=None) -> jax.Array:
  """Gradient of a replicated parameter from per-replica sums.

  Under `shard_map(check_vma=True)` a parameter that is invariant across the
  mapped axes needs a cotangent summed over them (that is what autodiff of the
  plain forward yields). Under `vmap` or `shard_map(check_vma=False)` the
  per-replica contribution is returned, as autodiff would, and summed later by
  the user's collective (or by vmap's transpose).

  Args:
    local: this replica's contribution.
    reduced: `cross_replica_sum(local, ...)` already computed.
    like: the parameter whose cotangent this is.
    axis_name: tuple of mapped axis names or None.
    axis_index_groups: the grouping used for `reduced`.
  """
  # Every mesh axis the data varies over and the parameter does not, also axes
  # not in axis_name (per-device statistics, or a second mesh axis).
  need = _varying_axes(local) - _varying_axes(like)
  if not need:
    return local
  if (axis_name is not None and need == frozenset(axis_name)
      and axis_index_groups is None):
    return reduced
  return lax.psum(local, tuple(sorted(need)))


def feature_broadcast_shape(x_shape, feature_axes) -> tuple[int, ...]:
  """Shape that broadcasts a feature-shaped array against an input of `x_shape`."""
  return tuple(d if a in feature_axes else 1 for a, d in enumerate(x_shape))


def shifted_sums(x: jax.Array, reduction_axes: tuple[int, ...], shift: jax.Array,
                 mask: jax.Array | None, compute_dtype) -> jax.Array:
  """Local sums `[count,] sum(x - shift), sum((x - shift)**2)` stacked on axis 0.

  Shifting by a value near the mean keeps the one-pass variance accurate in
  floating point (the cancellation error scales with (mean - shift)**2 / var).
  Without a mask the count is static and omitted from the stack.
  """
  centered = x.astype(compute_dtype) - shift.reshape(
      feature_broadcast_shape(x.shape, [a for a in range(x.ndim)
                                        if a not in reduction_axes]))
  if mask is None:
    return jnp.stack([jnp.sum(centered, reduction_axes),
                      jnp.sum(centered * centered, reduction_axes)])
  weight = jnp.broadcast_to(mask, x.shape).astype(compute_dtype)
  weighted = weight * centered
  return jnp.stack([jnp.sum(weight, reduction_axes),
                    jnp.sum(weighted, reduction_axes),
                    jnp.sum(weighted * centered, reduction_axes)])


def moments_from_sums(count, sum_centered, sum_squares, shift) -> Moments:
  """Mean and biased variance from shifted sums; empty features get var 0."""
  safe_count = jnp.maximum(count, 1)
  mean_minus_shift = sum_centered / safe_count
  var = jnp.maximum(sum_squares / safe_count - mean_minus_shift * mean_minus_shift, 0)
  return Moments(count=count, mean=shift + mean_minus_shift, var=var)


def moments(x: jax.typing.ArrayLike, *, axis=-1, mask=None, shift=None,
            axis_name=None, axis_index_groups=None) -> Moments:
  """Count-weighted per-feature mean and biased variance of `x`.

  Every axis of `x` except the feature `axis` is reduced; with `axis_name` the
  statistics are pooled over the named mapped axes with a single psum.

  Args:
    x: floating-point array of any shape.
    axis: feature axis or axes (int or tuple); the rest are reduced.
    mask: optional boolean array broadcastable to `x`; only True elements count.
    shift: optional feature-shaped value near the mean that improves accuracy
      of the one-pass variance (it does not change the result mathematically).
      Default: the local mean (one extra pass over `x`). Under `axis_name` the
      default is 0, since per-replica shifts cannot be combined in one psum;
      pass a replicated estimate (e.g. a running mean) when |mean| >> std.
    axis_name: mapped axis name(s) to pool over (vmap / shard_map).
    axis_index_groups: optional equal-size partition of replicas.

  Returns:
    `Moments(count, mean, var)` in float32 (or float64 for float64 input), of
    shape `feature_shape`.
  """
  x = jnp.asarray(x)
  _validation.check_floating(x)
  feature_axes = _validation.canonicalize_axes(axis, x.ndim)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  names = _validation.normalize_axis_name(axis_name)
  groups = _validation.normalize_axis_index_groups(axis_index_groups, names)
  if mask is not None:
    mask = _validation.broadcast_mask(mask, x.shape)
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  if shift is None:
    shift = (data_shift(x, reduction_axes, mask) if names is None
             else jnp.zeros(feature_shape, compute_dtype))
  shift = lax.stop_gradient(jnp.asarray(shift, compute_dtype).reshape(feature_shape))
  sums = cross_replica_sum(shifted_sums(x, reduction_axes, shift, mask, compute_dtype),
                           names, groups)
  if mask is None:
    local_count = int(np.prod([x.shape[a] for a in reduction_axes]))
    count = jnp.full(feature_shape,
                     local_count * replica_count(names, groups), compute_dtype)
    return moments_from_sums(count, sums[0], sums[1], shift)
  return moments_from_sums(sums[0], sums[1], sums[2], shift)


def data_shift(x: jax.Array, reduction_axes: tuple[int, ...],
               mask: jax.Array | None = None) -> jax.Array:
  """A per-feature value near the data's mean (one extra pass over `x`).

  Used as the shift of the one-pass variance when nothing better (a running
  mean) is known. It is local: under `axis_name` each replica would get its own
  value, which a single psum of shifted sums cannot combine.
  """
  if mask is None:
    return jnp.mean(x, reduction_axes, dtype=jnp.float32)
  weight = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  total = jnp.sum(weight * x.astype(jnp.float32), reduction_axes)
  return total / jnp.maximum(jnp.sum(weight, reduction_axes), 1)


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Pools two count-weighted `Moments` exactly (Chan et al.'s parallel update)."""
  count = a.count + b.count
  safe = jnp.maximum(count, 1)
  weight_b = b.count / safe
  delta = b.mean - a.mean
  mean = a.mean + delta * weight_b
  var = (a.var * a.count + b.var * b.count) / safe + delta * delta * (
      a.count * b.count) / (safe * safe)
  return Moments(count=count, mean=mean, var=var)


def first_element(x: jax.Array, reduction_axes: tuple[int, ...]) -> jax.Array:
  """The element at index 0 of every reduced axis (no extra pass over `x`).

  Not usable on an axis sharded with `AxisType.Explicit`; prefer `data_shift`.
  """
  index = tuple(0 if a in reduction_axes else slice(None) for a in range(x.ndim))
  return x[index]
