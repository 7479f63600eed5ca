"""The training- and inference-mode normalization every batch-norm variant shares.

`parse_call` checks and parses a call's arguments; `training_layout_and_shift`,
`batch_statistics` and `normalize_with_batch_stats` (a `jax.custom_vjp` with the
closed-form backward pass of Ioffe & Szegedy, 2015, saving only `x` and
per-feature vectors) normalize with the batch's statistics; `update_state` folds
them into the running statistics; `normalize_with_running_stats` is inference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _state
from jaxbn import _stats
from jaxbn import _validation


class Layout(NamedTuple):
  """Static description of one training-mode call (hashable, for custom_vjp)."""
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  epsilon: float
  axis_name: tuple | None
  axis_index_groups: tuple | None
  static_count: int | None  # global element count per feature, when no mask
  # Redo the sums with the batch's own mean when the shift is too far from it
  # (see `batch_statistics`); only without axis_name.
  check_shift: bool = False


# How far (in batch standard deviations) the shift of the one-pass variance
# may be from the batch mean before `check_shift` redoes the sums: the
# relative error of the variance is about 6e-8 * distance**2 in float32, so
# at most ~4e-6 here.
_MAX_SHIFT_DISTANCE = 8.0


def to_input_rank(value: jax.Array, x: jax.Array, layout: Layout) -> jax.Array:
  return value.reshape(_stats.feature_broadcast_shape(x.shape, layout.feature_axes))


class Running(NamedTuple):
  """Running statistics in the compute dtype, feature-shaped (no gradient)."""
  mean: jax.Array
  var: jax.Array


def running_statistics(state: _state.BatchNormState, compute_dtype) -> Running:
  return Running(mean=lax.stop_gradient(state.mean.astype(compute_dtype)),
                 var=lax.stop_gradient(state.var.astype(compute_dtype)))


def batch_statistics(x, shift, mask, running: Running, layout: Layout) -> _stats.Moments:
  """The (pooled) batch moments that normalize `x` in training.

  A feature with no valid element (every one masked out) has no batch
  statistics; it is normalized with the `running` ones instead (as in
  inference), and its `count` of 0 keeps its running statistics unchanged.

  With `layout.check_shift`, in programs compiled for CPU: if the shift is
  more than `_MAX_SHIFT_DISTANCE` batch standard deviations from the batch mean
  of any feature, the sums are redone around the batch's own mean (two more
  reads of `x`, inside a `lax.cond`, so only on the steps that need it). The
  GPU and TPU compilers do not keep that branch off the step's path (XLA:GPU
  turns it into a select that always runs it, the TPU compiler materializes
  float32 copies of `x` for it; measured with `python -m benchmarks.compiled`),
  so there the shift is used as it is, as it always is under `axis_name`.
  """
  compute_dtype = shift.dtype

  def moments_around(shift):
    sums = _stats.cross_replica_sum(
        _stats.shifted_sums(x, layout.reduction_axes, shift, mask, compute_dtype),
        layout.axis_name, layout.axis_index_groups)
    if mask is None:
      count = jnp.full(shift.shape, layout.static_count, compute_dtype)
      return _stats.moments_from_sums(count, sums[0], sums[1], shift)
    return _stats.moments_from_sums(sums[0], sums[1], sums[2], shift)

  stats = moments_around(shift)
  if layout.check_shift:
    def redo_if_far(stats):
      distance = stats.mean - shift
      too_far = distance * distance > _MAX_SHIFT_DISTANCE**2 * (stats.var + layout.epsilon)
      if mask is not None:
        too_far = too_far & (stats.count > 0)
      return lax.cond(
          jnp.any(too_far),
          lambda: moments_around(
              _stats.data_shift(x, layout.reduction_axes, mask).astype(compute_dtype)),
          lambda: stats)

    stats = lax.platform_dependent(stats, cpu=redo_if_far, default=lambda stats: stats)
  if mask is None:
    return stats
  has_data = stats.count > 0
  return stats._replace(mean=jnp.where(has_data, stats.mean, running.mean),
                        var=jnp.where(has_data, stats.var, running.var))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def normalize_with_batch_stats(x, scale, bias, shift, mask, running, layout):
  """Returns `(y, batch_moments)`; the moments are only used under stop_gradient."""
  outputs, _ = _normalize_fwd(x, scale, bias, shift, mask, running, layout)
  return outputs


def _normalize_fwd(x, scale, bias, shift, mask, running, layout: Layout):
  compute_dtype = shift.dtype
  stats = batch_statistics(x, shift, mask, running, layout)
  inv_std = lax.rsqrt(stats.var + layout.epsilon)
  multiplier = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
  y = (x.astype(compute_dtype) - to_input_rank(stats.mean, x, layout)) * to_input_rank(
      multiplier, x, layout)
  if bias is not None:
    y = y + to_input_rank(bias.astype(compute_dtype), x, layout)
  residuals = (x, scale, bias, mask, stats.mean, inv_std, stats.count)
  return (y.astype(x.dtype), stats), residuals


def normalize_bwd(layout: Layout, residuals, cotangents):
  # The moments output is consumed under stop_gradient only (see batch_norm), so
  # its cotangent is zero and ignored here.
  x, scale, bias, mask, mean, inv_std, count = residuals
  dy, _ = cotangents
  compute_dtype = mean.dtype
  grad_out = dy.astype(compute_dtype)
  centered = x.astype(compute_dtype) - to_input_rank(mean, x, layout)
  local, sum_dy, sum_dy_xhat = backward_sums(grad_out, centered, inv_std, mask, layout)
  multiplier = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
  # The multiplier goes on last: dy - correction cancels exactly where it
  # should (one value per feature: dx = 0, as autodiff of the forward gives).
  correction = input_correction(sum_dy, sum_dy_xhat, centered, inv_std, count, mask, layout)
  dx = to_input_rank(multiplier, x, layout) * (grad_out - correction)
  dscale, dbias = parameter_gradients(local, sum_dy, sum_dy_xhat, scale, bias, layout)
  return dx.astype(x.dtype), dscale, dbias, None, None, None


def backward_sums(grad_out, centered, inv_std, mask, layout: Layout):
  """`(local, sum_dy, sum_dy_xhat)` of the closed-form backward pass.

  Args:
    grad_out: the output's cotangent in the compute dtype, `x`'s shape.
    centered: `x - mean` in the compute dtype.
    inv_std: per-feature `1 / sqrt(var + epsilon)`.
    mask: the call's mask, or None.
    layout: the call's `Layout`.

  Returns:
    This replica's stacked `(sum dy, sum dy * x_hat)` and the same sums over
    the whole (pooled) batch.
  """
  dy_centered = grad_out * centered
  if mask is not None:
    # Masked-out outputs still depend on scale, bias and the statistics, but
    # one whose cotangent is 0 (unused) contributes exactly 0, whatever its
    # input holds: select, since 0 * nan is nan.
    dy_centered = jnp.where(mask | (grad_out != 0), dy_centered, 0)
  # dbeta = sum(dy), dgamma = sum(dy * x_hat) = inv_std * sum(dy * (x - mean)):
  # one fused pass, one stacked collective. inv_std goes on the per-feature sum,
  # which keeps the full-size fusions small (measurably faster on XLA:CPU).
  sum_dy_local, sum_dy_centered_local = _stats.fused_sums(
      (grad_out, dy_centered), layout.reduction_axes)
  local = jnp.stack([sum_dy_local, sum_dy_centered_local * inv_std])
  total = _stats.cross_replica_sum(local, layout.axis_name, layout.axis_index_groups)
  return local, total[0], total[1]


def input_correction(sum_dy, sum_dy_xhat, centered, inv_std, count, mask, layout: Layout):
  """`mean(dy) + x_hat * mean(dy * x_hat)`, what `dy` loses to the statistics.

  dx = gamma * inv_std * (dy - correction); only valid (masked-in) elements
  feed the statistics, so only they get the correction. A feature without any
  (count 0) was normalized with constant statistics.
  """
  safe_count = jnp.maximum(count, 1)
  correction = (to_input_rank(sum_dy / safe_count, centered, layout)
                + centered * to_input_rank(inv_std * sum_dy_xhat / safe_count,
                                            centered, layout))
  if mask is not None:
    correction = jnp.where(mask, correction, 0)
  return correction


def parameter_gradients(local, sum_dy, sum_dy_xhat, scale, bias, layout: Layout):
  """`(dscale, dbias)` of the closed-form backward pass (None where the parameter is).

  Args:
    local: this replica's `(sum dy, sum dy * x_hat)` before the cross-replica sum.
    sum_dy, sum_dy_xhat: the same sums over the whole (pooled) batch.
    scale, bias: the parameters, or None.
    layout: the call's `Layout`.
  """
  dscale = dbias = None
  if scale is not None:
    dscale = _stats.replicated_sum(local[1], sum_dy_xhat, scale, layout.axis_name,
                                   layout.axis_index_groups).astype(scale.dtype)
  if bias is not None:
    dbias = _stats.replicated_sum(local[0], sum_dy, bias, layout.axis_name,
                                  layout.axis_index_groups).astype(bias.dtype)
  return dscale, dbias


normalize_with_batch_stats.defvjp(_normalize_fwd, normalize_bwd)


def _shift_estimate(state: _state.BatchNormState, momentum: float | None) -> jax.Array:
  """A replicated value near the batch mean, from the running mean (no traffic).

  The EMA starts at zero, so it is debiased like Adam's moments: after one step
  `mean / (1 - momentum**count)` already equals the previous batch mean.
  """
  mean = state.mean.astype(jnp.float32)
  if momentum is None or momentum == 0.0:
    return mean
  started = state.count > 0
  debias = 1.0 - jnp.power(jnp.float32(momentum), state.count.astype(jnp.float32))
  return jnp.where(started, mean / jnp.where(started, debias, 1.0), mean)


def training_shift(state: _state.BatchNormState, x: jax.Array, momentum: float | None,
                    reduction_axes: tuple[int, ...], mask, names: tuple | None,
                    compute_dtype) -> jax.Array:
  """The replicated per-feature shift of a training step's one-pass moments."""
  shift = _shift_estimate(state, momentum)
  if names is None:
    # Before the first update there is no estimate of the mean: in programs
    # compiled for CPU take one more pass over x, only on that step (lax.cond
    # runs one branch there). With axis_name this would cost a second
    # collective, and the GPU and TPU compilers run such a branch on every step
    # (see `batch_statistics`), so there the first step shifts by the state's
    # mean as is (see the README's "Numerics" section).
    data_axes = tuple(_stats.varying_axes(x) - _stats.varying_axes(shift))
    if data_axes:
      # Per-device statistics under shard_map(check_vma=True): both branches
      # must vary over the same mesh axes.
      shift = lax.pcast(shift, data_axes, to="varying")

    def first_step_pass(shift):
      return lax.cond(state.count > 0, lambda: shift,
                      lambda: _stats.data_shift(x, reduction_axes, mask))

    shift = lax.platform_dependent(shift, cpu=first_step_pass, default=lambda shift: shift)
  return lax.stop_gradient(shift.astype(compute_dtype))


def training_layout_and_shift(call: ParsedCall, state: _state.BatchNormState, *,
                              single_value_ok: bool, countless_state: bool
                              ) -> tuple[Layout, jax.Array]:
  """The layout and the one-pass variance's shift of a training call.

  See `normalize_in_training` for `single_value_ok` and `countless_state`.
  """
  layout = call.layout(training_count(call, single_value_ok=single_value_ok))
  if countless_state:
    layout = layout._replace(check_shift=call.axis_name is None)
    return layout, lax.stop_gradient(state.mean.astype(call.compute_dtype))
  return layout, training_shift(state, call.x, call.momentum, call.reduction_axes,
                                call.mask, call.axis_name, call.compute_dtype)


def normalize_in_training(call: ParsedCall, state: _state.BatchNormState, *,
                          unbiased_running_var: bool, single_value_ok: bool,
                          countless_state: bool) -> tuple[jax.Array, _state.BatchNormState]:
  """The training-mode half of `batch_norm` on checked arguments.

  Args:
    call: from `parse_call`.
    state: the running statistics.
    unbiased_running_var: as in `batch_norm`.
    single_value_ok: accept one value per feature (variance 0, flax's
      behaviour) instead of raising.
    countless_state: `state.count` means nothing (flax's variables hold no
      step count). The shift of the one-pass variance is then the stored
      running mean as it is, and without `axis_name`, in programs compiled
      for CPU, the sums are redone around the batch's own mean on the steps
      where that running mean is far from it (a fresh state on data with
      |mean| >> std; see `batch_statistics` for GPUs and TPUs). Otherwise
      `state.count` chooses: the debiased running mean once it is > 0, and
      before that (without `axis_name`, on CPU) the batch's own mean.
  """
  layout, shift = training_layout_and_shift(call, state, single_value_ok=single_value_ok,
                                            countless_state=countless_state)
  y, stats = normalize_with_batch_stats(call.x, call.scale, call.bias, shift, call.mask,
                                         running_statistics(state, call.compute_dtype),
                                         layout)
  stats = jax.tree.map(lax.stop_gradient, stats)
  return y, update_state(state, stats, call.momentum, unbiased_running_var)


class ParsedCall(NamedTuple):
  """The checked, canonical arguments of one batch-norm call (trace-time values)."""
  x: jax.Array
  scale: jax.Array | None
  bias: jax.Array | None
  mask: jax.Array | None
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]
  axis_name: tuple | None
  axis_index_groups: tuple | None
  epsilon: float
  momentum: float | None
  compute_dtype: jnp.dtype

  def layout(self, static_count: int | None) -> Layout:
    return Layout(self.feature_axes, self.reduction_axes, self.epsilon, self.axis_name,
                   self.axis_index_groups, static_count)


def parse_call(params, state, x, *, axis, momentum, epsilon, axis_name,
               axis_index_groups, mask) -> ParsedCall:
  """Checks the arguments shared by every batch-norm variant (at trace time).

  Raises:
    TypeError / ValueError: as documented in `batch_norm`, naming the argument.
  """
  x, feature_axes, reduction_axes, feature_shape = _validation.parse_input(x, axis)
  epsilon = _validation.check_epsilon(epsilon)
  momentum = _validation.check_momentum(momentum)
  if params is not None:
    _validation.check_feature_shape(params, feature_shape, tree_name="params",
                                    field_names=("scale", "bias"), x_shape=x.shape,
                                    feature_axes=feature_axes)
  _validation.check_feature_shape(state, feature_shape, tree_name="state",
                                  field_names=("mean", "var"), x_shape=x.shape,
                                  feature_axes=feature_axes)
  names = _validation.normalize_axis_name(axis_name)
  groups = _validation.normalize_axis_index_groups(axis_index_groups, names)
  _validation.check_axis_names_bound(names)
  if mask is not None:
    mask = _validation.broadcast_mask(mask, x.shape)
  return ParsedCall(
      x=x, scale=None if params is None else params.scale,
      bias=None if params is None else params.bias, mask=mask,
      feature_axes=feature_axes, reduction_axes=reduction_axes,
      feature_shape=feature_shape, axis_name=names, axis_index_groups=groups,
      epsilon=epsilon, momentum=momentum,
      compute_dtype=jnp.promote_types(x.dtype, jnp.float32))


def training_count(call: ParsedCall, *, single_value_ok: bool = False) -> int | None:
  """Global element count per feature without a mask (None with one).

  Raises:
    ValueError: one value per feature over the whole batch (no variance),
      unless `single_value_ok`.
  """
  if call.mask is not None:
    return None
  x = call.x
  local_count = int(np.prod([x.shape[a] for a in call.reduction_axes]))
  count = local_count * _stats.replica_count(call.axis_name, call.axis_index_groups)
  if count < 2 and not single_value_ok:
    raise ValueError(
        "training=True needs more than one value per feature over the whole "
        f"batch to compute a variance; x of shape {x.shape} with feature axes "
        f"{call.feature_axes} has {count}. Use a larger batch or training=False.")
  return count


def normalize_with_running_stats(call: ParsedCall, state: _state.BatchNormState) -> jax.Array:
  compute_dtype = call.compute_dtype
  inv_std = lax.rsqrt(state.var.astype(compute_dtype) + call.epsilon)
  multiplier = inv_std if call.scale is None else inv_std * call.scale.astype(compute_dtype)
  offset = -state.mean.astype(compute_dtype) * multiplier
  if call.bias is not None:
    offset = offset + call.bias.astype(compute_dtype)
  shape = _stats.feature_broadcast_shape(call.x.shape, call.feature_axes)
  y = call.x.astype(compute_dtype) * multiplier.reshape(shape) + offset.reshape(shape)
  return y.astype(call.x.dtype)


def update_state(state: _state.BatchNormState, stats: _stats.Moments,
                  momentum: float | None, unbiased_running_var: bool) -> _state.BatchNormState:
  batch_var = stats.var
  if unbiased_running_var:
    batch_var = batch_var * jnp.where(stats.count > 1,
                                      stats.count / jnp.maximum(stats.count - 1, 1), 1)
  old_mean = state.mean.astype(jnp.float32)
  old_var = state.var.astype(jnp.float32)
  batch_mean = stats.mean.astype(jnp.float32)
  batch_var = batch_var.astype(jnp.float32)
  if isinstance(state, _state.BatchStatisticsProbe):
    # A feature without a valid element has no batch statistics: var = -1,
    # which no variance can be, tells recompute_stats to leave it out.
    has_data = stats.count > 0
    return _state.BatchStatisticsProbe(mean=jnp.where(has_data, batch_mean, 0.0),
                                 var=jnp.where(has_data, batch_var, -1.0),
                                 count=state.count + 1)
  if momentum is None:
    weight = 1.0 / (state.count.astype(jnp.float32) + 1.0)
    new_mean = old_mean + weight * (batch_mean - old_mean)
    new_var = old_var + weight * (batch_var - old_var)
  else:
    new_mean = momentum * old_mean + (1.0 - momentum) * batch_mean
    new_var = momentum * old_var + (1.0 - momentum) * batch_var
  # A feature with no valid element, or non-finite input, keeps its old value:
  # NaN never reaches the running statistics.
  keep = (stats.count > 0) & jnp.isfinite(new_mean) & jnp.isfinite(new_var)
  return _state.BatchNormState(mean=jnp.where(keep, new_mean, old_mean),
                        var=jnp.where(keep, new_var, old_var),
                        count=state.count + 1)
