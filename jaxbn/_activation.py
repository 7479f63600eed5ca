"""Batch norm fused with an activation, optionally saving only its output (InPlace-ABN).

Batch norm followed by an activation keeps, for the backward pass, the batch
norm's input (and the activation's input or a mask), while the layer after it
(a convolution) keeps the activation's output as its own input. With
`memory_saving=True` the pair keeps only that output: the backward pass
recovers the activation's input by inverting the activation and the
normalized input by inverting the affine map (Rota Bulo et al., "In-Place
Activated BatchNorm for Memory-Optimized Training of DNNs", CVPR 2018):

  z = act^-1(y),  x_hat = (z - bias) / scale,

and then applies batch norm's closed-form backward to `dz = act'(z) * dy`.
This needs an invertible activation (leaky ReLU with a positive slope, or the
identity) and a nonzero scale: as InPlace-ABN does, the memory-saving layer
uses `|scale| + epsilon` in place of `scale` (in training and inference), so
its scale can neither vanish nor change sign. The gradients are those of the
unfused composition `act(batch_norm(x))` with that scale, to rounding; where
`|scale|` is small next to `|bias|` the recovered `x_hat` loses precision
(by about `|bias| / |scale|` times the rounding of `y`'s dtype).

Without `memory_saving` the pair keeps `x` (and the shortcut); in programs
compiled for GPUs its one closed-form backward pass recomputes `z` and
`act'(z)` from them wherever a full-size result needs them, so that no
`act'(z) * dy` array is written between the sums and `dx` (XLA:GPU writes one
for the unfused pair); elsewhere it is the two layers.
"""

from __future__ import annotations

import functools
import numbers

import jax
from jax import lax
import jax.numpy as jnp

from jaxbn import _batch_norm
from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _stats
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask

ACTIVATIONS = ("identity", "relu", "leaky_relu")


def check_activation(activation: str | None, negative_slope: float,
                     memory_saving: bool) -> float | None:
  """Validates the activation options; returns the slope below 0 (None: no activation).

  Raises:
    ValueError: unknown `activation`; a negative or non-finite slope;
      `memory_saving` with a non-invertible activation.
  """
  if activation is None:
    if memory_saving:
      raise ValueError(
          "memory_saving=True needs an invertible activation: activation='leaky_relu' "
          "or 'identity'.")
    return None
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}.")
  if (isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real)
      or not 0.0 <= float(negative_slope) < float("inf")):
    raise ValueError(f"negative_slope must be a finite number >= 0, got {negative_slope!r}.")
  slope = {"identity": 1.0, "relu": 0.0, "leaky_relu": float(negative_slope)}[activation]
  if memory_saving and slope <= 0.0:
    raise ValueError(
        f"memory_saving=True recovers the activation's input from its output, which "
        f"activation={activation!r} with slope {slope} cannot (ReLU maps every "
        "negative input to 0): use activation='leaky_relu' with negative_slope > 0.")
  return slope


def apply_activation(z: jax.Array, slope: float | None) -> jax.Array:
  """`z` for slope 1 or None, ReLU for 0, leaky ReLU otherwise."""
  if slope is None or slope == 1.0:
    return z
  if slope == 0.0:
    return jax.nn.relu(z)
  return jnp.where(z >= 0, z, z * jnp.asarray(slope, z.dtype))


def invertible_scale(scale: jax.Array | None, epsilon: float) -> jax.Array | None:
  """InPlace-ABN's scale: `|scale| + epsilon`, never 0 (the gradient flows through abs)."""
  return None if scale is None else jnp.abs(scale) + jnp.asarray(epsilon, scale.dtype)


def _pre_activation(x, scale, bias, shortcut, mean, inv_std, layout):
  """`(x - mean) * inv_std * scale + bias [+ shortcut]` in the compute dtype, and `x - mean`."""
  compute_dtype = inv_std.dtype
  centered = x.astype(compute_dtype) - _normalization.to_input_rank(mean, x, layout)
  multiplier = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
  z = centered * _normalization.to_input_rank(multiplier, x, layout)
  if bias is not None:
    z = z + _normalization.to_input_rank(bias.astype(compute_dtype), x, layout)
  if shortcut is not None:
    z = z + shortcut.astype(compute_dtype)
  return z, centered


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _normalize_act_saving_output(x, scale, bias, shift, mask, running, shortcut, layout,
                                 slope):
  outputs, _ = _saving_output_fwd(x, scale, bias, shift, mask, running, shortcut, layout,
                                  slope)
  return outputs


def _saving_output_fwd(x, scale, bias, shift, mask, running, shortcut, layout, slope):
  stats = _normalization.batch_statistics(x, shift, mask, running, layout)
  inv_std = lax.rsqrt(stats.var + layout.epsilon)
  z, _ = _pre_activation(x, scale, bias, shortcut, stats.mean, inv_std, layout)
  y = apply_activation(z, slope).astype(x.dtype)
  # Only the output (which the next layer keeps anyway), the shortcut (the
  # block's input, kept by its first layer) and per-feature vectors.
  residuals = (y, scale, bias, mask, inv_std, stats.count, shortcut)
  return (y, stats), residuals


def _saving_output_bwd(layout, slope, residuals, cotangents):
  y, scale, bias, mask, inv_std, count, shortcut = residuals
  # The forward pass converts the shortcut to float32 too; without the barrier
  # XLA merges the two converts and keeps a float32 copy alive until here.
  y, shortcut = lax.optimization_barrier((y, shortcut))
  dy, _ = cotangents
  compute_dtype = inv_std.dtype
  y = y.astype(compute_dtype)
  grad_out = dy.astype(compute_dtype)
  if slope != 1.0:
    negative = y < 0
    z = jnp.where(negative, y / slope, y)
    grad_out = jnp.where(negative, grad_out * slope, grad_out)
  else:
    z = y
  dshortcut = None
  if shortcut is not None:
    z = z - shortcut.astype(compute_dtype)
    dshortcut = grad_out.astype(shortcut.dtype)
  if bias is not None:
    z = z - _normalization.to_input_rank(bias.astype(compute_dtype), y, layout)
  x_hat = z if scale is None else z / _normalization.to_input_rank(
      scale.astype(compute_dtype), y, layout)
  dz_x_hat = grad_out * x_hat
  if mask is not None:
    # What masked-out slots hold (NaN, inf) must not reach the sums; see
    # `_normalization.normalize_bwd`.
    dz_x_hat = jnp.where(mask | (grad_out != 0), dz_x_hat, 0)
  sum_dz_local, sum_dz_x_hat_local = _stats.fused_sums((grad_out, dz_x_hat),
                                                       layout.reduction_axes)
  local = jnp.stack([sum_dz_local, sum_dz_x_hat_local])
  total = _stats.cross_replica_sum(local, layout.axis_name, layout.axis_index_groups)
  sum_dz, sum_dz_x_hat = total[0], total[1]
  multiplier = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
  safe_count = jnp.maximum(count, 1)
  correction = (_normalization.to_input_rank(sum_dz / safe_count, y, layout)
                + x_hat * _normalization.to_input_rank(sum_dz_x_hat / safe_count, y, layout))
  if mask is not None:
    correction = jnp.where(mask, correction, 0)
  dx = _normalization.to_input_rank(multiplier, y, layout) * (grad_out - correction)
  dscale, dbias = _normalization.parameter_gradients(local, sum_dz, sum_dz_x_hat, scale,
                                                     bias, layout)
  return dx.astype(dy.dtype), dscale, dbias, None, None, None, dshortcut


_normalize_act_saving_output.defvjp(_saving_output_fwd, _saving_output_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _normalize_act_saving_input(x, scale, bias, shift, mask, running, shortcut, layout,
                                slope):
  """`act(batch_norm(x) [+ shortcut])` with one closed-form backward pass (saves `x`)."""
  outputs, _ = _saving_input_fwd(x, scale, bias, shift, mask, running, shortcut, layout,
                                 slope)
  return outputs


def _saving_input_fwd(x, scale, bias, shift, mask, running, shortcut, layout, slope):
  stats = _normalization.batch_statistics(x, shift, mask, running, layout)
  inv_std = lax.rsqrt(stats.var + layout.epsilon)
  z, _ = _pre_activation(x, scale, bias, shortcut, stats.mean, inv_std, layout)
  y = apply_activation(z, slope).astype(x.dtype)
  residuals = (x, scale, bias, mask, stats.mean, inv_std, stats.count, shortcut)
  return (y, stats), residuals


def _saving_input_bwd(layout, slope, residuals, cotangents):
  """Batch norm's closed-form backward pass through the activation's derivative.

  The activation's derivative is recomputed from `x` where each full-size
  result needs it, never stored: the sums read `x` and `dy`, and so does `dx`
  (as `act'(z) * dy` written out in each, so that no `act'(z) * dy` array is
  materialized between them; `dshortcut` is that array).
  """
  x, scale, bias, mask, mean, inv_std, count, shortcut = residuals
  dy, _ = cotangents
  compute_dtype = mean.dtype
  z, centered = _pre_activation(x, scale, bias, shortcut, mean, inv_std, layout)
  grad_in = dy.astype(compute_dtype)
  if slope == 1.0:
    active, grad_out = None, grad_in
  else:
    # jax.nn.relu's derivative is 0 at 0; the leaky ReLU's (`apply_activation`) 1.
    active = z > 0 if slope == 0.0 else z >= 0
    grad_out = jnp.where(active, grad_in, grad_in * slope)
  local, sum_dz, sum_dz_x_hat = _normalization.backward_sums(grad_out, centered, inv_std,
                                                              mask, layout)
  multiplier = inv_std if scale is None else inv_std * scale.astype(compute_dtype)
  correction = _normalization.input_correction(sum_dz, sum_dz_x_hat, centered, inv_std,
                                               count, mask, layout)
  scaled = _normalization.to_input_rank(multiplier, x, layout)
  if active is None:
    dx = scaled * (grad_in - correction)
  else:
    dx = jnp.where(active, scaled * (grad_in - correction),
                   scaled * (grad_in * slope - correction))
  dshortcut = None if shortcut is None else grad_out.astype(shortcut.dtype)
  dscale, dbias = _normalization.parameter_gradients(local, sum_dz, sum_dz_x_hat, scale,
                                                     bias, layout)
  return dx.astype(x.dtype), dscale, dbias, None, None, None, dshortcut


_normalize_act_saving_input.defvjp(_saving_input_fwd, _saving_input_bwd)


def normalize_act_in_training(call: _normalization.ParsedCall,
                              state: _state.BatchNormState, *, slope: float,
                              single_value_ok: bool, countless_state: bool,
                              shortcut: jax.Array | None = None,
                              memory_saving: bool = True
                              ) -> tuple[jax.Array, _stats.Moments]:
  """Training-mode `act(batch_norm(x) [+ shortcut])` with one closed-form backward pass.

  With `memory_saving` the backward pass keeps only the output (and the
  shortcut), and `call.scale` must already be nonzero (`invertible_scale`);
  otherwise it keeps `x` (and the shortcut), like `jaxbn.batch_norm`, and,
  compiled for GPUs, recomputes the activation's derivative from it. Returns `y` and the batch's
  `Moments` (stop_gradient) for `_normalization.update_state`; the shift of the
  one-pass variance is chosen as in `_normalization.normalize_in_training`.
  """
  layout, shift = _normalization.training_layout_and_shift(
      call, state, single_value_ok=single_value_ok, countless_state=countless_state)
  running = _normalization.running_statistics(state, call.compute_dtype)
  if memory_saving:
    y, stats = _normalize_act_saving_output(call.x, call.scale, call.bias, shift, call.mask,
                                            running, shortcut, layout, slope)
  else:
    fused = functools.partial(_normalize_act_saving_input, layout=layout, slope=slope)
    composed = functools.partial(_normalize_then_act, layout=layout, slope=slope)
    # The fused backward pass saves XLA:GPU a write and two reads of the masked
    # gradient per layer; libtpu fuses the composition as well by itself (and
    # compiles ResNets to fewer bytes and cycles without the fused pass), and
    # XLA:CPU keeps its own tuned batch-norm kernels: BENCHMARKS.md, "Compiled
    # for GPUs and TPUs".
    y, stats = lax.platform_dependent(call.x, call.scale, call.bias, shift, call.mask,
                                      running, shortcut, cuda=fused, rocm=fused,
                                      default=composed)
  return y, jax.tree.map(lax.stop_gradient, stats)


def _normalize_then_act(x, scale, bias, shift, mask, running, shortcut, *, layout, slope):
  """`act(batch_norm(x) [+ shortcut])` as two layers (autodiff through the activation)."""
  y, stats = _normalization.normalize_with_batch_stats(x, scale, bias, shift, mask, running,
                                                        layout)
  return apply_activation(add_shortcut(y, shortcut), slope), stats


def add_shortcut(y: jax.Array, shortcut: jax.Array | None) -> jax.Array:
  """`y + shortcut`, added in at least float32, in `y`'s dtype."""
  if shortcut is None:
    return y
  compute_dtype = jnp.promote_types(y.dtype, jnp.float32)
  return (y.astype(compute_dtype) + shortcut.astype(compute_dtype)).astype(y.dtype)


def check_shortcut(shortcut, x_shape: tuple[int, ...]) -> jax.Array | None:
  """Raises unless `shortcut` is None or a floating array of `x`'s shape."""
  if shortcut is None:
    return None
  shortcut = jnp.asarray(shortcut)
  if shortcut.shape != tuple(x_shape):
    raise ValueError(
        f"shortcut must have the input's shape {tuple(x_shape)}, got {shortcut.shape}.")
  _validation.check_floating(shortcut, "shortcut")
  return shortcut


def batch_norm_activation(params: _state.BatchNormParams | None,
                          state: _state.BatchNormState, x: jax.typing.ArrayLike, *,
                          training: bool, activation: str = "leaky_relu",
                          negative_slope: float = 0.01, memory_saving: bool = False,
                          axis: Axis = -1, momentum: float | None = 0.99, epsilon: float = 1e-5,
                          axis_name: AxisName | None = None,
                          axis_index_groups: AxisIndexGroups | None = None,
                          mask: Mask | None = None, unbiased_running_var: bool = False,
                          shortcut=None) -> tuple[jax.Array, _state.BatchNormState]:
  """Batch norm followed by an activation: `act(scale * x_hat + bias [+ shortcut])`.

  Without `memory_saving` this is `act(jaxbn.batch_norm(...)[0])`; compiled
  for GPUs, with one closed-form backward pass through both that keeps `x`
  and recomputes the activation's derivative from it (no `act'(z) * dy` array
  is written between batch norm's two backward passes). With it
  (InPlace-ABN), the training-mode backward pass keeps only the output `y`
  (which the next layer usually keeps anyway as its input), not `x`, and
  the layer's scale is `|scale| + epsilon` in training and inference (so
  the affine map can be inverted).

  Args:
    params: `BatchNormParams(scale, bias)` or None, as in `jaxbn.batch_norm`.
    state: `BatchNormState` of running statistics.
    x: floating-point input, e.g. `(N, H, W, C)`.
    training: batch statistics and a new state (True) or the running ones.
    activation: "leaky_relu" (`x if x >= 0 else negative_slope * x`),
      "relu" or "identity".
    negative_slope: leaky ReLU's slope below 0 (> 0 with `memory_saving`).
    memory_saving: save only the output for the backward pass; needs
      "leaky_relu" with `negative_slope > 0` or "identity".
    axis: feature axis or axes.
    momentum: weight of the old running value (None: cumulative average).
    epsilon: added to the variance; also the floor of `|scale| + epsilon`.
    axis_name: mapped axis name(s) to pool the statistics over.
    axis_index_groups: optional equal-size partition of the replicas.
    mask: optional boolean array broadcastable to `x`; True elements count.
    unbiased_running_var: store `n / (n - 1)` times the batch variance.
    shortcut: optional array of `x`'s shape added before the activation (a
      residual block's `act(bn(conv(...)) + shortcut)`). With `memory_saving`
      the backward pass keeps it (a block's first layer keeps it anyway) and
      still not `x`.

  Returns:
    `(y, new_state)` as `jaxbn.batch_norm`.

  Raises:
    ValueError: unknown `activation`, a bad `negative_slope`, `memory_saving`
      with "relu"; and `jaxbn.batch_norm`'s errors.
  """
  slope = check_activation(activation, negative_slope, memory_saving)
  training = _validation.check_training(training)
  shortcut = check_shortcut(shortcut, jnp.shape(x))
  if memory_saving and params is not None:
    params = params._replace(scale=invertible_scale(jnp.asarray(params.scale), epsilon))
  if not training:
    y, new_state = _batch_norm.batch_norm(
        params, state, x, training=training, axis=axis, momentum=momentum,
        epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
        mask=mask, unbiased_running_var=unbiased_running_var)
    return apply_activation(add_shortcut(y, shortcut), slope), new_state
  call = _normalization.parse_call(params, state, x, axis=axis, momentum=momentum,
                                epsilon=epsilon, axis_name=axis_name,
                                axis_index_groups=axis_index_groups, mask=mask)
  y, stats = normalize_act_in_training(call, state, slope=slope, single_value_ok=False,
                                       countless_state=False, shortcut=shortcut,
                                       memory_saving=memory_saving)
  return y, _normalization.update_state(state, stats, call.momentum, unbiased_running_var)
