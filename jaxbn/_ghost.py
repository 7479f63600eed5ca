"""Ghost batch normalization (Hoffer et al., 2017) as a pure function.

Training normalizes each contiguous "ghost" batch of `virtual_batch_size`
examples with its own statistics: a large batch then regularizes like the
small batches it is made of. The ghost axis is carried as one more feature
axis through the core's batch-norm kernel, so nothing is duplicated and a
batch sharded over devices keeps every ghost batch on one device.
"""

from __future__ import annotations

import numbers

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask


def _check_virtual_batch_size(virtual_batch_size) -> int:
  if isinstance(virtual_batch_size, (bool, np.bool_)) or not isinstance(
      virtual_batch_size, (numbers.Integral, np.integer)):
    raise TypeError(
        f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}.")
  if virtual_batch_size < 1:
    raise ValueError(
        f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}.")
  return int(virtual_batch_size)


def ghost_batch_norm(params: _state.BatchNormParams | None, state: _state.BatchNormState,
                     x: jax.typing.ArrayLike, *, training: bool, virtual_batch_size: int,
                     batch_axis: int = 0, axis: Axis = -1, momentum: float | None = 0.99,
                     epsilon: float = 1e-5, axis_name: AxisName | None = None,
                     axis_index_groups: AxisIndexGroups | None = None, mask: Mask | None = None,
                     unbiased_running_var: bool = False
                    ) -> tuple[jax.Array, _state.BatchNormState]:
  """Batch norm with statistics per ghost batch of `virtual_batch_size` examples.

  In training, `x` is split along `batch_axis` into `N / virtual_batch_size`
  contiguous ghost batches (examples `[0, V)`, `[V, 2V)`, ...); each is
  normalized with its own per-feature mean and biased variance, reduced over
  its `V` examples and every other non-feature axis (height, width, ...).
  `scale` and `bias` are shared. The statistics never cross devices: under
  `shard_map` a ghost batch is part of one replica's batch, and under `jit`
  over a batch-sharded `x` every ghost batch stays on one device when `V`
  divides the per-device batch.

  The running statistics are updated once per call, from the statistics of the
  whole batch pooled exactly from the ghost batches (count-weighted: the mean
  of the ghost means; the mean of the ghost variances plus the variance of the
  ghost means). That is what `jaxbn.batch_norm` stores for the same batch, so
  inference uses population statistics. The alternative, the mean of the ghost
  variances (tf_keras), lacks the variance of the ghost means: it underestimates
  the population variance by about a factor `(V - 1) / V` (25% at `V=4`), and
  inference outputs would come out `sqrt(V / (V - 1))` times wider than the
  unit-variance outputs each ghost batch produced in training.

  With `axis_name`, the normalization statistics stay per ghost batch and only
  this update is pooled over the replicas (two psums of feature-sized vectors,
  see `_pool_ghost_statistics`), so every replica keeps the same state, equal to
  the single-device result on the global batch. Without it each replica updates
  from its own examples (`jaxbn.sync_stats` merges them later).

  Args:
    params: `BatchNormParams(scale, bias)` of shape `feature_shape`, or None.
    state: `BatchNormState(mean, var, count)` of running statistics.
    x: floating-point input with the batch on `batch_axis`, e.g. `(N, H, W, C)`.
    training: Python bool; False is `batch_norm(..., training=False)` (no
      ghost batches, so any batch size works).
    virtual_batch_size: examples per ghost batch, `V`; must divide
      `x.shape[batch_axis]` in training.
    batch_axis: the axis of `x` that indexes examples; not a feature axis.
    axis: as `jaxbn.batch_norm`'s.
    momentum: as `jaxbn.batch_norm`'s.
    epsilon: as `jaxbn.batch_norm`'s.
    axis_index_groups: as `jaxbn.batch_norm`'s.
    axis_name: as `jaxbn.batch_norm`'s; it pools the running-statistics update
      (each ghost batch is normalized with its own statistics).
    mask: as `jaxbn.batch_norm`'s, per ghost batch and in the pooled update.
    unbiased_running_var: store `n / (n - 1)` times the pooled batch variance,
      `n` the number of valid elements per feature in the whole batch.

  Returns:
    `(y, new_state)`: `y` of `x`'s shape and dtype; `new_state` float32.

  Raises:
    TypeError: non-float `x`, bad `training`, `mask` or `virtual_batch_size`.
    ValueError: `virtual_batch_size` does not divide the batch, `batch_axis` is
      out of range or a feature axis, a ghost batch has a single value per
      feature, or any `jaxbn.batch_norm` error.
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.
  """
  virtual_batch_size = _check_virtual_batch_size(virtual_batch_size)
  training = _validation.check_training(training)
  call = _normalization.parse_call(
      params, state, x, axis=axis, momentum=momentum, epsilon=epsilon,
      axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask)
  x, feature_axes = call.x, call.feature_axes
  (batch_axis,) = _validation.canonicalize_axes(batch_axis, x.ndim, name="batch_axis")
  if batch_axis in feature_axes:
    raise ValueError(
        f"batch_axis={batch_axis} is also a feature axis (axis={axis!r}); the "
        "batch axis must be one of the reduced axes.")
  if not training:
    return _normalization.normalize_with_running_stats(call, state), state
  batch_size = x.shape[batch_axis]
  if batch_size % virtual_batch_size:
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} must divide the batch size "
        f"{batch_size} (x.shape[{batch_axis}] of x with shape {x.shape}); "
        "under shard_map this is the per-replica batch.")
  num_ghosts = batch_size // virtual_batch_size
  _check_ghosts_stay_on_device(x, batch_axis, num_ghosts, virtual_batch_size)

  # Ghost layout: batch_axis becomes (num_ghosts, virtual_batch_size); the
  # ghost axis is treated as one more feature axis, the within-ghost axis is
  # reduced. Original axis a > batch_axis moves to a + 1.
  ghost_shape = (x.shape[:batch_axis] + (num_ghosts, virtual_batch_size)
                 + x.shape[batch_axis + 1:])
  ghost_axis = batch_axis
  ghost_feature_axes = tuple(sorted(
      [ghost_axis] + [a + 1 if a > batch_axis else a for a in feature_axes]))
  ghost_reduction_axes = tuple(a for a in range(len(ghost_shape))
                               if a not in ghost_feature_axes)
  ghost_stat_shape = tuple(ghost_shape[a] for a in ghost_feature_axes)
  ghost_position = ghost_feature_axes.index(ghost_axis)
  x_ghost = x.reshape(ghost_shape)

  def per_ghost(value):
    return _explicit_sharding_like(
        jnp.broadcast_to(jnp.expand_dims(value, ghost_position), ghost_stat_shape),
        x_ghost, ghost_feature_axes)

  static_count = None
  if call.mask is None:
    static_count = int(np.prod([ghost_shape[a] for a in ghost_reduction_axes]))
    if static_count < 2:
      raise ValueError(
          "training=True needs more than one value per feature in each ghost "
          f"batch; virtual_batch_size={virtual_batch_size} with x of shape "
          f"{x.shape} and feature axes {feature_axes} gives {static_count}.")
  # Statistics per ghost batch only: no axis_name in the normalization.
  layout = _normalization.Layout(ghost_feature_axes, ghost_reduction_axes, call.epsilon,
                               None, None, static_count)
  mask_ghost = None if call.mask is None else _ghost_mask(
      call.mask, x.ndim, batch_axis, num_ghosts, virtual_batch_size)
  # Each ghost batch is shifted by the running mean, or on the first step by its
  # own mean (a local pass): the normalization never needs another device.
  ghost_shift = _normalization.training_shift(
      state._replace(mean=per_ghost(state.mean)), x_ghost, call.momentum,
      ghost_reduction_axes, mask_ghost, None, call.compute_dtype)
  scale = None if call.scale is None else per_ghost(call.scale)
  bias = None if call.bias is None else per_ghost(call.bias)
  running = _normalization.running_statistics(
      state._replace(mean=per_ghost(state.mean), var=per_ghost(state.var)),
      call.compute_dtype)
  y_ghost, ghost_stats = _normalization.normalize_with_batch_stats(
      x_ghost, scale, bias, ghost_shift, mask_ghost, running, layout)
  ghost_stats = jax.tree.map(lax.stop_gradient, ghost_stats)
  batch_stats = _pool_ghost_statistics(ghost_stats, ghost_position, call.axis_name,
                                       call.axis_index_groups)
  new_state = _normalization.update_state(state, batch_stats, call.momentum,
                                        unbiased_running_var)
  return y_ghost.reshape(x.shape), new_state


def _explicit_spec(x: jax.Array) -> tuple[object, tuple[tuple[str, ...], ...]]:
  """The mesh of `x`'s type and, per axis of `x`, its `AxisType.Explicit` mesh axes.

  Empty tuples outside explicit sharding (Auto axes, shard_map, vmap, no mesh).
  """
  sharding = jax.typeof(x).sharding
  mesh = getattr(sharding, "mesh", None)
  explicit = {name for name, kind in zip(getattr(mesh, "axis_names", ()),
                                         getattr(mesh, "axis_types", ()))
              if kind == jax.sharding.AxisType.Explicit}
  spec = tuple(getattr(sharding, "spec", ())) + (None,) * x.ndim
  entries = []
  for entry in spec[:x.ndim]:
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    entries.append(tuple(n for n in names if n in explicit))
  return mesh, tuple(entries)


def _check_ghosts_stay_on_device(x, batch_axis, num_ghosts, virtual_batch_size):
  """Under Explicit sharding a ghost batch spanning devices has no sharding."""
  mesh, entries = _explicit_spec(x)
  names = entries[batch_axis]
  num_shards = int(np.prod([mesh.shape[n] for n in names]))
  if num_ghosts % num_shards:
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} must divide the per-device batch "
        f"{x.shape[batch_axis] // num_shards} of x, whose batch axis is sharded "
        f"over {names} ({num_shards} shards); otherwise ghost batches would span "
        "devices. Use a smaller virtual_batch_size or reshard x.")


def _explicit_sharding_like(value: jax.Array, x: jax.Array,
                            value_axes: tuple[int, ...]) -> jax.Array:
  """`value` (over `value_axes` of `x`) sharded like `x` along them.

  Only under `AxisType.Explicit` sharding, where the ghost axis of `x` carries
  its sharding in the type and `lax.cond` and the custom VJP need the per-ghost
  values' types to match it.
  """
  mesh, entries = _explicit_spec(x)
  value_entries = [entries[a] or None for a in value_axes]
  if not any(value_entries):
    return value
  return jax.sharding.reshard(
      value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*value_entries)))


def _ghost_mask(mask: jax.Array, ndim: int, batch_axis: int, num_ghosts: int,
                virtual_batch_size: int) -> jax.Array:
  """Reshapes a mask broadcastable to x into one broadcastable to the ghost layout."""
  shape = (1,) * (ndim - mask.ndim) + mask.shape
  split = ((num_ghosts, virtual_batch_size) if shape[batch_axis] != 1 else (1, 1))
  return mask.reshape(shape[:batch_axis] + split + shape[batch_axis + 1:])


def _pool_ghost_statistics(ghost_stats: _stats.Moments, ghost_position: int,
                           names, groups) -> _stats.Moments:
  """The whole batch's moments, pooled exactly from the ghost moments.

  Count-weighted, in two reductions over the ghost axis (and over the replicas
  under `axis_name`): the mean first, then `sum n (var + (mean_g - mean)**2)`.
  A single reduction of shifted sums would need a shift common to all ghost
  batches and replicas, which on the first step only a cross-device pass over
  `x` could provide.
  """
  def total(stacked):
    return _stats.cross_replica_sum(jnp.sum(stacked, axis=1 + ghost_position),
                                    names, groups)
  # zeros_like: the counts take the means' sharding (stack needs equal ones).
  count = jnp.zeros_like(ghost_stats.mean) + ghost_stats.count
  count_total, sum_total = total(jnp.stack([count, count * ghost_stats.mean]))
  safe_count = jnp.maximum(count_total, 1)
  mean = sum_total / safe_count
  deviation = ghost_stats.mean - jnp.expand_dims(mean, ghost_position)
  (sum_squares,) = total((count * (ghost_stats.var + deviation * deviation))[None])
  return _stats.Moments(count=count_total, mean=mean, var=sum_squares / safe_count)
