"""Batch Renormalization (Ioffe, 2017) as a pure function.

Training normalizes with the batch statistics like batch norm, then corrects
toward the running statistics with `r = sigma_B / sigma` and `d = (mu_B - mu) /
sigma` (clipped, no gradient): when the clips are inactive the output equals
what inference will compute, `(x - mu) / sigma`, so training and inference
see the same function while gradients still flow through the batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import numbers
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _batch_norm
from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask

Bound = float | Callable[[jax.Array], jax.typing.ArrayLike]


def _check_bound(value, name: str, minimum: float) -> Bound:
  """Validates `r_max` / `d_max`: a number >= minimum (inf allowed) or a callable."""
  if callable(value):
    return value
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a Python number or a callable of the step count "
        f"(e.g. an optax schedule), got a traced value; pass {name}=lambda "
        "count: ... to make it depend on training progress.")
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.floating, np.integer, np.ndarray, jax.Array)):
    raise TypeError(
        f"{name} must be a number or a callable of the step count, got {value!r}.")
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
  value = float(value)
  if math.isnan(value) or value < minimum:
    raise ValueError(f"{name} must be >= {minimum:g} (inf disables the clip), "
                     f"got {value!r}.")
  return value


def _bound_value(bound: Bound, count: jax.Array, name: str, minimum: float,
                 compute_dtype) -> jax.Array:
  """The bound at the state's step count, as a scalar of `compute_dtype`."""
  if not callable(bound):
    return jnp.asarray(bound, compute_dtype)
  value = jnp.asarray(bound(count))
  if value.shape != ():
    raise ValueError(
        f"{name}(count) must return a scalar, got shape {value.shape}.")
  if not (jnp.issubdtype(value.dtype, jnp.floating)
          or jnp.issubdtype(value.dtype, jnp.integer)):
    raise TypeError(f"{name}(count) must return a real number, got dtype {value.dtype}.")
  # A schedule's value cannot be checked at trace time; values below the
  # minimum mean "no correction" (r in [1, 1], d in [0, 0]).
  return jnp.maximum(value.astype(compute_dtype), minimum)


def batch_renorm(params: _state.BatchNormParams | None, state: _state.BatchNormState,
                 x: jax.typing.ArrayLike, *, training: bool, r_max: Bound, d_max: Bound,
                 axis: Axis = -1, momentum: float | None = 0.99, epsilon: float = 1e-5,
                 axis_name: AxisName | None = None,
                 axis_index_groups: AxisIndexGroups | None = None, mask: Mask | None = None,
                 unbiased_running_var: bool = False
                ) -> tuple[jax.Array, _state.BatchNormState]:
  """Batch renormalization: `y = scale * (x_hat * r + d) + bias`.

  In training, `x_hat = (x - mu_B) / sigma_B` uses the batch statistics
  (pooled over `axis_name` like `jaxbn.batch_norm`) and

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))

  with `sigma_B = sqrt(var_B + epsilon)`, and `mu`, `sigma = sqrt(var +
  epsilon)` the running statistics in `state` before this step's update.
  Unclipped, `x_hat * r + d = (x - mu) / sigma`: the output inference will
  compute. `r_max=1, d_max=0` is `jaxbn.batch_norm` exactly. The running
  statistics are updated from the batch statistics exactly as `batch_norm`
  does (an EMA of mean and variance, not of sigma as in the paper), and
  inference (`training=False`) is `batch_norm`'s.

  The state starts at mean 0, var 1, so early corrections compare the batch to
  an uninformed running estimate; the paper therefore trains with `r_max=1,
  d_max=0` for the first steps and then relaxes them. Pass callables of the
  step count for that, e.g. `optax.linear_schedule(1.0, 3.0, 35_000, 5_000)`.

  Args:
    params: `BatchNormParams(scale, bias)` of shape `feature_shape`, or None.
    state: `BatchNormState(mean, var, count)`; `count` (int32 scalar, the
      number of training steps so far) is what callable bounds receive.
    x: floating-point input, e.g. `(N, H, W, C)` or `(N, C)`.
    training: Python bool; False is `batch_norm(..., training=False)`.
    r_max: upper clip of `r` (its lower clip is `1 / r_max`): a number >= 1
      (`inf` disables the clip) or a callable `count -> scalar`; a callable's
      values below 1 act as 1.
    d_max: clip of `|d|`: a number >= 0 (`inf` disables it) or a callable
      `count -> scalar`; a callable's negative values act as 0.
    axis: as `jaxbn.batch_norm`'s.
    momentum: as `jaxbn.batch_norm`'s.
    epsilon: added to both variances before the square root; > 0.
    axis_name: as `jaxbn.batch_norm`'s.
    axis_index_groups: as `jaxbn.batch_norm`'s.
    mask: as `jaxbn.batch_norm`'s.
    unbiased_running_var: as `jaxbn.batch_norm`'s.

  Returns:
    `(y, new_state)`: `y` of `x`'s shape and dtype; `new_state` float32.

  Raises:
    TypeError: non-float `x`, bad `training`, `mask`, `r_max` or `d_max` type.
    ValueError: `r_max < 1`, `d_max < 0`, or any `jaxbn.batch_norm` error.
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.
  """
  r_max = _check_bound(r_max, "r_max", 1.0)
  d_max = _check_bound(d_max, "d_max", 0.0)
  if not _validation.check_training(training):
    return _batch_norm.batch_norm(
        params, state, x, training=False, axis=axis, momentum=momentum,
        epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
        mask=mask, unbiased_running_var=unbiased_running_var)
  call = _normalization.parse_call(
      params, state, x, axis=axis, momentum=momentum, epsilon=epsilon,
      axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask)
  layout = call.layout(_normalization.training_count(call))
  compute_dtype = call.compute_dtype
  shift = _normalization.training_shift(state, call.x, call.momentum, call.reduction_axes,
                                      call.mask, call.axis_name, compute_dtype)
  running = _normalization.running_statistics(state, compute_dtype)
  corrections = _Corrections(
      running_mean=running.mean, running_var=running.var,
      r_max=_bound_value(r_max, state.count, "r_max", 1.0, compute_dtype),
      d_max=_bound_value(d_max, state.count, "d_max", 0.0, compute_dtype))
  y, stats = _renormalize(call.x, call.scale, call.bias, shift, call.mask, corrections,
                          layout)
  stats = jax.tree.map(lax.stop_gradient, stats)
  return y, _normalization.update_state(state, stats, call.momentum, unbiased_running_var)


class _Corrections(NamedTuple):
  """Inputs of r and d besides the batch statistics; they get no gradient."""
  running_mean: jax.Array
  running_var: jax.Array
  r_max: jax.Array
  d_max: jax.Array


def _r_and_d(stats: _stats.Moments, corrections: _Corrections, epsilon: float):
  running_mean, running_var, r_max, d_max = corrections
  running_inv_std = lax.rsqrt(running_var + epsilon)
  r = jnp.clip(jnp.sqrt(stats.var + epsilon) * running_inv_std, 1.0 / r_max, r_max)
  d = jnp.clip((stats.mean - running_mean) * running_inv_std, -d_max, d_max)
  return r, d


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _renormalize(x, scale, bias, shift, mask, corrections, layout):
  """Returns `(y, batch_moments)`; the moments are only used under stop_gradient."""
  outputs, _ = _renormalize_fwd(x, scale, bias, shift, mask, corrections, layout)
  return outputs


def _renormalize_fwd(x, scale, bias, shift, mask, corrections, layout):
  compute_dtype = shift.dtype
  stats = _normalization.batch_statistics(
      x, shift, mask, _normalization.Running(corrections.running_mean,
                                          corrections.running_var), layout)
  r, d = _r_and_d(stats, corrections, layout.epsilon)
  # scale * (x_hat * r + d) + bias is batch norm with scale * r and
  # scale * d + bias: the core's backward applies unchanged (r, d constant).
  if scale is None:
    effective_scale, effective_bias = r, d
  else:
    effective_scale = scale.astype(compute_dtype) * r
    effective_bias = scale.astype(compute_dtype) * d + bias.astype(compute_dtype)
  inv_std = lax.rsqrt(stats.var + layout.epsilon)
  to_input_rank = functools.partial(_normalization.to_input_rank, x=x, layout=layout)
  y = (x.astype(compute_dtype) - to_input_rank(stats.mean)) * to_input_rank(
      inv_std * effective_scale) + to_input_rank(effective_bias)
  core_residuals = (x, effective_scale, effective_bias, mask, stats.mean, inv_std,
                    stats.count)
  return (y.astype(x.dtype), stats), (core_residuals, scale, bias, r, d)


def _renormalize_bwd(layout, residuals, cotangents):
  core_residuals, scale, bias, r, d = residuals
  dx, d_effective_scale, d_effective_bias, *_ = _normalization.normalize_bwd(
      layout, core_residuals, cotangents)
  dscale = dbias = None
  if scale is not None:
    # Without axis_name under shard_map, r and d (hence the core's sums) are
    # per-device; the replicated scale and bias need them summed over devices.
    dscale = r * d_effective_scale + d * d_effective_bias
    dscale = _stats.replicated_sum(dscale, dscale, scale, None).astype(scale.dtype)
    dbias = _stats.replicated_sum(d_effective_bias, d_effective_bias, bias,
                                  None).astype(bias.dtype)
  return dx, dscale, dbias, None, None, None


_renormalize.defvjp(_renormalize_fwd, _renormalize_bwd)
