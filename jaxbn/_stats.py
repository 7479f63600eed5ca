"""Per-feature moments, the one cross-replica reduction, and running averages.

All statistics here are *count-weighted*: replicas (or batches) that contribute
more valid elements weigh more, so pooled results equal what a single device
would compute on the concatenated valid elements. Cross-replica statistics use
exactly one sum-reduction (psum) whose payload is independent of the number of
replicas.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask


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


def varying_axes(value) -> frozenset:
  """Mesh axes over which `value` varies under shard_map(check_vma=True)."""
  aval = jax.typeof(value)
  vma = getattr(aval, "vma", None)
  if vma is None:
    manual = getattr(aval, "manual_axis_type", None)
    vma = getattr(manual, "varying", frozenset()) if manual is not None else frozenset()
  return frozenset(vma)


def cross_replica_sum(value: jax.Array, axis_name: tuple | None,
                      axis_index_groups: AxisIndexGroups | None = None) -> jax.Array:
  """Sums `value` over the named mapped axes (or replica groups) in one collective.

  Args:
    value: any array; summed elementwise over replicas.
    axis_name: tuple of mapped axis names, or None for no reduction.
    axis_index_groups: optional partition of replicas into equal groups; each
      replica receives the sum over its own group.

  Returns:
    An array of `value`'s shape and dtype.
  """
  return _cross_replica_reduce(value, axis_name, axis_index_groups, lax.psum, 0)


def cross_replica_max(value: jax.Array, axis_name: tuple | None,
                      axis_index_groups: AxisIndexGroups | None = None) -> jax.Array:
  """Elementwise max over replicas (or each replica's group) in one collective."""
  return _cross_replica_reduce(value, axis_name, axis_index_groups, lax.pmax, -jnp.inf)


def _cross_replica_reduce(value, axis_name, axis_index_groups, collective, identity):
  if axis_name is None:
    return value
  if axis_index_groups is None:
    return collective(value, axis_name)
  try:
    return collective(value, axis_name, axis_index_groups=axis_index_groups)
  except NotImplementedError:
    # vmap and shard_map(check_vma=True) have no grouped collectives. Reduce a
    # (num_groups, ...) layout in which other groups' slots hold the identity:
    # still one collective, with a payload that grows with the number of groups
    # (not of replicas).
    num_replicas = sum(len(g) for g in axis_index_groups)
    group_of = np.zeros(num_replicas, np.int32)
    for group_id, members in enumerate(axis_index_groups):
      group_of[list(members)] = group_id
    my_group = jnp.asarray(group_of)[lax.axis_index(axis_name)]
    is_mine = jnp.arange(len(axis_index_groups)) == my_group
    slots = jnp.where(is_mine.reshape((-1,) + (1,) * value.ndim), value[None],
                      jnp.asarray(identity, value.dtype))
    return collective(slots, axis_name)[my_group]


def replicated_sum(local: jax.Array, reduced: jax.Array, like: jax.Array, axis_name: tuple | None,
                   axis_index_groups: AxisIndexGroups | None = None) -> jax.Array:
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
  need = varying_axes(local) - varying_axes(like)
  if not need:
    return local
  if (axis_name is not None and need == frozenset(axis_name)
      and axis_index_groups is None):
    return reduced
  return lax.psum(local, tuple(sorted(need)))


def feature_broadcast_shape(x_shape, feature_axes) -> tuple[int, ...]:
  """Shape that broadcasts a feature-shaped array against an input of `x_shape`."""
  return tuple(d if a in feature_axes else 1 for a, d in enumerate(x_shape))


# Rows per block of `fused_sums`: XLA:CPU's loop emitter vectorizes a variadic
# reduce over up to ~32 rows; at 64 it falls off a cliff (benchmarks/, perf notes).
_MAX_ROWS_PER_BLOCK = 32


def _add_pairs(a, b):
  return tuple(u + v for u, v in zip(a, b))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fused_sums(terms: tuple[jax.Array, ...],
               reduction_axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Sums several same-shape arrays over `reduction_axes` in one fused pass.

  The platform the program is compiled for picks the algorithm
  (`lax.platform_dependent`). On XLA:CPU each single-operand reduce goes to a
  library kernel that cannot fuse a producer with a broadcast operand (like
  `x - mean[None]`), so separate `jnp.sum`s would materialize that producer and
  read it once per sum: there the leading reduced rows are split into blocks
  of <= 32, one variadic reduce sums all terms inside each block (producers
  computed in registers), and small `jnp.sum`s finish over the blocks. The GPU
  and TPU compilers fuse sibling reductions of one producer into one kernel by
  themselves, and the block reshapes would cut their tiled layouts (the TPU
  compiler then materializes float32 copies of the activations and leaves
  unfused reduces): there the terms are plain `jnp.sum`s.

  Args:
    terms: arrays of one shape.
    reduction_axes: sorted axes to reduce.

  Returns:
    A tuple with each term summed over `reduction_axes`.
  """
  return tuple(lax.platform_dependent(
      *terms, cpu=functools.partial(blocked_sums, reduction_axes=reduction_axes),
      default=functools.partial(plain_sums, reduction_axes=reduction_axes)))


def plain_sums(*terms: jax.Array, reduction_axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """`fused_sums` for the GPU and TPU compilers: one `jnp.sum` per term."""
  return _varying_like_all(tuple(jnp.sum(t, reduction_axes) for t in terms), terms)


def _varying_like_all(sums: tuple[jax.Array, ...], terms) -> tuple[jax.Array, ...]:
  """`sums` marked varying over every mesh axis any term varies over (shard_map).

  The branches of `lax.platform_dependent` must agree on them, and a variadic
  reduce makes all its results vary where any operand does.
  """
  axes = frozenset().union(*(varying_axes(t) for t in terms))
  def cast(value):
    missing = tuple(sorted(axes - varying_axes(value)))
    return lax.pcast(value, missing, to="varying") if missing else value
  return tuple(cast(value) for value in sums)


def blocked_sums(*terms: jax.Array, reduction_axes: tuple[int, ...]
                 ) -> tuple[jax.Array, ...]:
  """`fused_sums` for XLA:CPU: a variadic reduce over blocks of <= 32 rows."""
  blocked = _split_rows_into_blocks(terms, reduction_axes)
  if blocked is None:
    return plain_sums(*terms, reduction_axes=reduction_axes)
  blocks, block_axis = blocked
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  partial_sums = lax.reduce(blocks, zeros, _add_pairs, (block_axis,))
  return _varying_like_all(tuple(jnp.sum(p, tuple(range(block_axis)))
                                for p in partial_sums), terms)


def _block_size(rows: int) -> int | None:
  return next((r for r in range(_MAX_ROWS_PER_BLOCK, 3, -1) if rows % r == 0), None)


def _split_rows_into_blocks(terms, reduction_axes):
  """Reshapes leading reduced axes to expose a block axis of <= 32 rows.

  Splits the innermost reduced axis when it has a divisor in [4, 32] (outer
  axes, and any explicit sharding on them, stay intact); otherwise merges all
  reduced axes first. Returns None when neither works (then plain sums run).
  """
  shape = terms[0].shape
  num_reduced = len(reduction_axes)
  if num_reduced == 0 or tuple(reduction_axes) != tuple(range(num_reduced)):
    return None
  features = shape[num_reduced:]
  innermost = shape[num_reduced - 1]
  block = _block_size(innermost)
  if block is not None:
    new_shape = shape[:num_reduced - 1] + (innermost // block, block) + features
    block_axis = num_reduced
  else:
    rows = int(np.prod(shape[:num_reduced]))
    block = _block_size(rows)
    if block is None:
      return None
    new_shape = (rows // block, block) + features
    block_axis = 1
  try:
    return tuple(t.reshape(new_shape) for t in terms), block_axis
  except Exception as error:
    # Explicitly sharded axes cannot always be merged or split; fall back.
    if type(error).__name__ != "ShardingTypeError":
      raise
    return None


@fused_sums.defjvp
def _fused_sums_jvp(reduction_axes, primals, tangents):
  # Summation is linear; plain sums keep the tangent transposable (reverse mode
  # of the custom backward, i.e. second-order derivatives).
  (terms,), (term_tangents,) = primals, tangents
  return (fused_sums(terms, reduction_axes),
          tuple(jnp.sum(t, reduction_axes) for t in term_tangents))


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
    return jnp.stack(fused_sums((centered, centered * centered), reduction_axes))
  mask = jnp.broadcast_to(mask, x.shape)
  # Select, never multiply: 0 * nan is nan, and padding may hold anything.
  valid_centered = jnp.where(mask, centered, 0)
  return jnp.stack(fused_sums((mask.astype(compute_dtype), valid_centered,
                               valid_centered * valid_centered), reduction_axes))


def moments_from_sums(count, sum_centered, sum_squares, shift) -> Moments:
  """Mean and biased variance from shifted sums.

  A feature with no valid element (`count == 0`) gets `mean = shift` and
  `var = 0`: finite values that `merge_moments` weighs by their zero count.
  """
  safe_count = jnp.maximum(count, 1)
  mean_minus_shift = sum_centered / safe_count
  var = jnp.maximum(sum_squares / safe_count - mean_minus_shift * mean_minus_shift, 0)
  return Moments(count=count, mean=shift + mean_minus_shift, var=var)


def moments(x: jax.typing.ArrayLike, *, axis: Axis = -1, mask: Mask | None = None, shift=None,
            axis_name: AxisName | None = None, axis_index_groups: AxisIndexGroups | None = None
           ) -> Moments:
  """Count-weighted per-feature mean and biased variance of `x`.

  Every axis of `x` except the feature `axis` is reduced; with `axis_name` the
  statistics are pooled over the named mapped axes with a single psum.

  Args:
    x: floating-point array of any shape.
    axis: feature axis or axes (int or tuple); the rest are reduced.
    mask: optional boolean array broadcastable to `x`; only True elements count,
      and what the others hold (NaN, inf) does not matter.
    shift: optional feature-shaped value near the mean that improves accuracy
      of the one-pass variance (it does not change the result mathematically).
      Default: the local mean (one extra pass over `x`). Under `axis_name` the
      default is 0, since per-replica shifts cannot be combined in one psum;
      pass a replicated estimate (e.g. a running mean) when |mean| >> std.
    axis_name: mapped axis name(s) to pool over (vmap / shard_map).
    axis_index_groups: optional equal-size partition of replicas.

  Returns:
    `Moments(count, mean, var)` in float32 (or float64 for float64 input), of
    shape `feature_shape`. A feature with no valid element has `count` 0,
    `var` 0 and `mean` equal to the shift (0 by default), so that pooling it
    with `merge_moments` changes nothing.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 5.0], [3.0, 5.0], [8.0, 5.0]])
    >>> m = jaxbn.moments(x)  # per column
    >>> m.count.tolist(), m.mean.tolist(), [round(float(v), 4) for v in m.var]
    ([3.0, 3.0], [4.0, 5.0], [8.6667, 0.0])
    >>> valid = jnp.array([True, True, False])[:, None]  # leave the last row out
    >>> jaxbn.moments(x, mask=valid).mean.tolist()
    [2.0, 5.0]
  """
  x, _, reduction_axes, feature_shape = _validation.parse_input(x, axis)
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
  mask = jnp.broadcast_to(mask, x.shape)
  total = jnp.sum(jnp.where(mask, x.astype(jnp.float32), 0), reduction_axes)
  return total / jnp.maximum(jnp.sum(mask, reduction_axes, dtype=jnp.float32), 1)


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Pools two count-weighted `Moments` exactly (Chan et al.'s parallel update).

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> a, b = jnp.array([[1.0], [3.0]]), jnp.array([[8.0]])
    >>> pooled = jaxbn.merge_moments(jaxbn.moments(a), jaxbn.moments(b))
    >>> whole = jaxbn.moments(jnp.concatenate([a, b]))
    >>> pooled.count.tolist(), pooled.mean.tolist(), whole.mean.tolist()
    ([3.0], [4.0], [4.0])
    >>> bool(jnp.allclose(pooled.var, whole.var))
    True
  """
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
