"""The computation shared by the flax.linen and flax.nnx BatchNorm adapters.

The adapters keep flax's variables exactly (`scale`, `bias`, `mean`, `var`; no
step counter) so checkpoints are interchangeable, and delegate the arithmetic
to `jaxbn.batch_norm`'s training kernel, where a step count would only choose
the shift of the one-pass variance. Without one, the shift is the stored
running mean as it is (no extra read of `x`). In programs compiled for CPU
and without `axis_name`, a step on which that running mean is more than 8
batch standard deviations from some feature's batch mean (a fresh state on
data with |mean| >> std: the running mean, undebiased, can be far from the
data for hundreds of steps) redoes the sums around the batch's own mean
inside a `lax.cond`, so the variance is accurate at any mean/std ratio on
every step and the steady state reads `x` as often as `jaxbn.batch_norm`.
Under `axis_name` that would cost a second collective, and on GPUs and TPUs
the compilers would run the redo on every step, so there the stored running
mean is used as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from jaxbn import _activation
from jaxbn import _batch_norm
from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _microbatch
from jaxbn import _stats


# Set (at trace time) by `recording_batch_statistics`.
_RECORDING = contextvars.ContextVar("jaxbn_recording_batch_statistics", default=False)


@contextlib.contextmanager
def recording_batch_statistics():
  """Within it, every adapter layer traced runs in training mode with momentum 0.

  Its updated `mean` and `var` are then exactly the batch's statistics: what
  PreciseBN (`jaxbn._flax_stats`) pools. It acts while a forward pass is
  traced, so use it inside the jitted function, not around a call of one.
  """
  token = _RECORDING.set(True)
  try:
    yield
  finally:
    _RECORDING.reset(token)


class Result(NamedTuple):
  """What `batch_norm` returns.

  Attributes:
    y: the output, in `out_dtype`.
    mean, var: the new running statistics (stop_gradient, in the dtypes of the
      stored ones), or None when the stored ones must not change.
    moments: with `pooled`: `pooled` merged with this batch's `Moments`
      (float32); else None.
  """
  y: jax.Array
  mean: jax.Array | None
  var: jax.Array | None
  moments: _stats.Moments | None = None


def batch_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
               mean: jax.Array, var: jax.Array, *, use_running_average: bool,
               initializing: bool, feature_axes: tuple[int, ...],
               momentum: float, epsilon: float, axis_name: Any,
               axis_index_groups: Any, mask: Any, out_dtype: Any,
               activation: str | None = None, negative_slope: float = 0.01,
               memory_saving: bool = False, pooled: _stats.Moments | None = None,
               shortcut: Any = None) -> Result:
  """Flax BatchNorm semantics on top of `jaxbn.batch_norm`.

  Args:
    x: input; widened to `out_dtype` first if that is wider (as flax computes).
    scale, bias: feature-shaped parameters, or None when unused.
    mean, var: the stored running statistics, feature-shaped.
    use_running_average: normalize with `mean`/`var` (inference).
    initializing: flax's `is_initializing()`: normalize with batch statistics
      of this replica only and leave the running statistics alone.
    feature_axes: canonical feature axes of `x`.
    momentum, epsilon, axis_name, axis_index_groups: as flax's BatchNorm.
    mask: optional array broadcastable to `x`, truthy where an element counts.
    out_dtype: dtype of the result.
    activation, negative_slope, memory_saving, shortcut: as
      `jaxbn.batch_norm_activation` (activation None: none).
    pooled: microbatch accumulation (training only): the `Moments` of the
      step's earlier microbatches. The batch's moments are merged into them,
      and the new statistics are one running-average update of `mean`, `var`
      (the statistics at the step's start) with the merged moments.

  Returns:
    A `Result`.
  """
  if _RECORDING.get():
    use_running_average, initializing, momentum = False, False, 0.0
  if momentum is None:
    raise TypeError(
        "momentum must be a float in [0, 1); flax's BatchNorm variables hold no "
        "step count, so the cumulative average (momentum=None) needs "
        "jaxbn.batch_norm with a BatchNormState.")
  slope = _activation.check_activation(activation, negative_slope, memory_saving)
  if memory_saving:
    scale = _activation.invertible_scale(scale, epsilon)
  x = jnp.asarray(x)
  shortcut = _activation.check_shortcut(shortcut, x.shape)
  if jnp.promote_types(x.dtype, out_dtype) != x.dtype:
    x = x.astype(out_dtype)
  params = None
  if scale is not None or bias is not None:
    like = scale if scale is not None else bias
    params = _state.BatchNormParams(
        scale=jnp.ones_like(like) if scale is None else scale,
        bias=jnp.zeros_like(like) if bias is None else bias)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)  # flax accepts 0/1 masks too
  # flax's variables hold no step count; see the module docstring.
  state = _state.BatchNormState(mean=mean, var=var, count=jnp.zeros((), jnp.int32))

  if use_running_average or initializing:
    if not use_running_average:
      # Like flax: batch statistics without axis_name (init usually runs
      # outside the mapped context, flax#1250) and any batch size, even 1. A
      # feature without a valid element uses the stored statistics, as in
      # training.
      batch = _stats.moments(x, axis=feature_axes, mask=mask)
      has_data = batch.count > 0
      state = state._replace(mean=jnp.where(has_data, batch.mean, mean),
                             var=jnp.where(has_data, batch.var, var))
    y, _ = _batch_norm.batch_norm(params, state, x, training=False, axis=feature_axes,
                                  epsilon=epsilon)
    y = _activation.apply_activation(_activation.add_shortcut(y, shortcut), slope)
    return Result(y.astype(out_dtype), None, None)

  call = _normalization.parse_call(
      params, state, x, axis=feature_axes, momentum=momentum, epsilon=epsilon,
      axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask)
  # One value per feature is flax's variance 0 (the output is `bias`), not an
  # error: flax code paths such as nnx.tabulate and per-example vmap do it.
  merged = None
  fused_activation = slope is not None and pooled is None
  if fused_activation:
    y, stats = _activation.normalize_act_in_training(
        call, state, slope=slope, single_value_ok=True, countless_state=True,
        shortcut=shortcut, memory_saving=memory_saving)
  elif pooled is not None:
    y, stats = _microbatch.training_moments(call, state, single_value_ok=True,
                                            countless_state=True)
    y = _activation.apply_activation(_activation.add_shortcut(y, shortcut), slope)
  else:
    y, new_state = _normalization.normalize_in_training(
        call, state, unbiased_running_var=False, single_value_ok=True, countless_state=True)
    y = _activation.apply_activation(_activation.add_shortcut(y, shortcut), slope)
  if fused_activation or pooled is not None:
    if pooled is not None:
      stats = merged = _stats.merge_moments(
          _stats.Moments(*(jnp.asarray(v, jnp.float32) for v in pooled)),
          jax.tree.map(lambda v: v.astype(jnp.float32), stats))
    new_state = _normalization.update_state(state, stats, momentum, False)
  new_mean = lax.stop_gradient(new_state.mean).astype(jnp.result_type(mean))
  new_var = lax.stop_gradient(new_state.var).astype(jnp.result_type(var))
  return Result(y.astype(out_dtype), new_mean, new_var, merged)


# --- microbatch accumulation (the `batch_moments` of jaxbn.linen / jaxbn.nnx) ---


def empty_accumulator(feature_shape: tuple[int, ...]) -> dict[str, jax.Array]:
  """A layer's accumulator before the step's first microbatch.

  `microbatches` counts the calls folded in; `count`, `mean`, `var` are their
  pooled `Moments`; `start_mean`, `start_var` the running statistics the step
  started with (set by the first call).
  """
  zeros = jnp.zeros(feature_shape, jnp.float32)
  return {"microbatches": jnp.zeros((), jnp.int32), "count": zeros, "mean": zeros,
          "var": zeros, "start_mean": zeros, "start_var": zeros}


def is_accumulator(node) -> bool:
  return isinstance(node, dict) and "microbatches" in node and "start_mean" in node


def accumulator_inputs(accumulator: dict[str, jax.Array], mean: jax.Array,
                       var: jax.Array) -> tuple[jax.Array, jax.Array, _stats.Moments]:
  """`(start_mean, start_var, pooled)` for `batch_norm`: the step's starting
  statistics (`mean`, `var` on the first microbatch) and the pooled moments."""
  started = accumulator["microbatches"] > 0
  start_mean = jnp.where(started, accumulator["start_mean"], mean).astype(mean.dtype)
  start_var = jnp.where(started, accumulator["start_var"], var).astype(var.dtype)
  pooled = _stats.Moments(accumulator["count"], accumulator["mean"], accumulator["var"])
  return start_mean, start_var, pooled


def next_accumulator(accumulator: dict[str, jax.Array], result: Result,
                     start_mean: jax.Array, start_var: jax.Array) -> dict[str, jax.Array]:
  return {"microbatches": accumulator["microbatches"] + 1,
          "count": result.moments.count, "mean": result.moments.mean,
          "var": result.moments.var, "start_mean": start_mean.astype(jnp.float32),
          "start_var": start_var.astype(jnp.float32)}


def pooled_statistics(accumulator: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`{"mean", "var"}` of all microbatches so far (the starting statistics where
  no microbatch had a valid element)."""
  has_data = accumulator["count"] > 0
  return {"mean": jnp.where(has_data, accumulator["mean"], accumulator["start_mean"]),
          "var": jnp.where(has_data, accumulator["var"], accumulator["start_var"])}
