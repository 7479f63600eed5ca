"""Running statistics updated once per step when a step runs over microbatches.

With gradient accumulation (a loop over k microbatches, or
`optax.MultiSteps`), `jaxbn.batch_norm(training=True)` on each microbatch
updates the running averages k times, each time with a small batch's
statistics. Here each microbatch is normalized with its own statistics, as
before, but returns its `Moments` instead of a new state; the k `Moments` pool
exactly with `merge_moments` (count-weighted: the mean and biased variance of
the concatenated microbatches), and `update_stats` applies one running-average
update with them: after k microbatches the state is what `batch_norm` would
return for the full batch (to float32 rounding).

To normalize every microbatch with the full batch's statistics instead, run
the microbatches twice: first `batch_norm_moments` under `lax.stop_gradient`
to pool the moments, then `batch_norm(training=False)` with the pooled moments
in place of the running statistics (`moments_state`). The statistics are then
constants of the second pass's gradient (see docs/microbatch.md for what that
costs and where it equals the full batch).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask


def empty_moments(num_features: int | tuple[int, ...]) -> _stats.Moments:
  """`Moments` of no data: the identity of `merge_moments`.

  Args:
    num_features: size of the feature axis (int) or shape of the feature axes.

  Returns:
    `Moments(count=0, mean=0, var=0)`, float32, of shape `feature_shape`.
  """
  shape = _validation.feature_shape_of(num_features)
  zeros = jnp.zeros(shape, jnp.float32)
  return _stats.Moments(count=zeros, mean=zeros, var=zeros)


def training_moments(call: _normalization.ParsedCall, state: _state.BatchNormState, *,
                     single_value_ok: bool, countless_state: bool
                     ) -> tuple[jax.Array, _stats.Moments]:
  """`_normalization.normalize_in_training` without the state update.

  Returns:
    `(y, moments)`: `y` normalized with the batch statistics (gradients
    through them, as in `batch_norm`), and the batch's `Moments` under
    stop_gradient; a feature with no valid element has count 0.
  """
  layout, shift = _normalization.training_layout_and_shift(
      call, state, single_value_ok=single_value_ok, countless_state=countless_state)
  y, stats = _normalization.normalize_with_batch_stats(
      call.x, call.scale, call.bias, shift, call.mask,
      _normalization.running_statistics(state, call.compute_dtype), layout)
  stats = jax.tree.map(lax.stop_gradient, stats)
  count = jnp.broadcast_to(stats.count, stats.mean.shape).astype(stats.mean.dtype)
  return y, stats._replace(count=count)


def batch_norm_moments(params: _state.BatchNormParams | None,
                       state: _state.BatchNormState, x: jax.typing.ArrayLike, *,
                       axis: Axis = -1, momentum: float | None = 0.99, epsilon: float = 1e-5,
                       axis_name: AxisName | None = None,
                       axis_index_groups: AxisIndexGroups | None = None, mask: Mask | None = None
                      ) -> tuple[jax.Array, _stats.Moments]:
  """Training-mode batch norm that returns the batch's moments, not a new state.

  `y` is exactly `batch_norm(params, state, x, training=True, ...)[0]` (same
  statistics, same closed-form gradient); `state` is only read (its running
  mean shifts the one-pass variance, and a feature with no valid element is
  normalized with it). Pool the returned moments of several microbatches with
  `merge_moments` and apply them once with `update_stats`.

  Args:
    params: `BatchNormParams(scale, bias)` or None, as in `jaxbn.batch_norm`.
    state: the running statistics (read only).
    x: floating-point input, e.g. `(N, H, W, C)`.
    axis: feature axis or axes.
    momentum: the momentum `update_stats` will use; here it only debiases the
      running mean that shifts the one-pass variance.
    epsilon: added to the variance before the square root.
    axis_name: mapped axis name(s) to pool the statistics over.
    axis_index_groups: optional equal-size partition of the replicas.
    mask: optional boolean array broadcastable to `x`; True elements count.

  Returns:
    `(y, moments)`: `y` of `x`'s shape and dtype; `Moments(count, mean, var)`
    of the (pooled, under `axis_name`) batch, float32, of shape
    `feature_shape`, under stop_gradient. A feature with no valid element has
    count 0 (and weighs nothing in `merge_moments` and `update_stats`).

  Raises:
    ValueError: as `jaxbn.batch_norm` in training mode (bad arguments, one
      value per feature).
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.
  """
  call = _normalization.parse_call(params, state, x, axis=axis, momentum=momentum,
                                epsilon=epsilon, axis_name=axis_name,
                                axis_index_groups=axis_index_groups, mask=mask)
  y, moments = training_moments(call, state, single_value_ok=False, countless_state=False)
  return y, jax.tree.map(lambda v: v.astype(jnp.float32), moments)


def update_stats(state: _state.BatchNormState, moments: _stats.Moments, *,
                 momentum: float | None = 0.99,
                 unbiased_running_var: bool = False) -> _state.BatchNormState:
  """One running-average update of `state` with (pooled) batch `moments`.

  `update_stats(state, batch_norm_moments(params, state, x)[1], momentum=m)`
  is `batch_norm(params, state, x, training=True, momentum=m)[1]`; with the
  `merge_moments` of k microbatches it is that of their concatenation.

  Args:
    state: the running statistics before the step.
    moments: `Moments` of feature shape (`count` 0 for a feature leaves it
      unchanged).
    momentum: weight of the old running value, or None for the cumulative
      average, as in `jaxbn.batch_norm`.
    unbiased_running_var: store `n / (n - 1)` times the batch variance, with
      `n` the pooled count.

  Returns:
    The new `BatchNormState` (float32, `count + 1`).

  Raises:
    ValueError: bad `momentum`, or `moments` not of the state's feature shape.
  """
  momentum = _validation.check_momentum(momentum)
  moments = _stats.Moments(*(jnp.asarray(v) for v in moments))
  feature_shape = jnp.shape(state.mean)
  for name, value in zip(moments._fields, moments):
    if jnp.shape(value) not in (feature_shape, ()):
      raise ValueError(
          f"moments.{name} has shape {jnp.shape(value)}; expected the state's "
          f"feature shape {feature_shape}.")
  moments = lax.stop_gradient(moments)
  return _normalization.update_state(state, moments, momentum, bool(unbiased_running_var))


def moments_state(state: _state.BatchNormState,
                  moments: _stats.Moments) -> _state.BatchNormState:
  """`state` with its statistics replaced by `moments` (for normalizing with them).

  `batch_norm(params, moments_state(state, pooled), x, training=False)`
  normalizes a microbatch with the full batch's pooled statistics (as
  constants). A feature with count 0 keeps the running statistics.
  """
  has_data = jnp.asarray(moments.count) > 0
  return state._replace(
      mean=jnp.where(has_data, moments.mean, state.mean).astype(state.mean.dtype),
      var=jnp.where(has_data, moments.var, state.var).astype(state.var.dtype))
