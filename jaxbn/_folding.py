"""Folding inference-mode batch norm into the preceding convolution or dense layer.

In inference mode batch norm is a per-channel affine map,
`y * multiplier + (beta - mean * multiplier)` with
`multiplier = gamma / sqrt(var + epsilon)`, so `bn(conv(x, kernel) + bias)`
equals `conv(x, kernel * multiplier) + (bias - mean) * multiplier + beta`, with
`multiplier` applied along the kernel's output-channel axis. The folded model
runs one layer instead of two and needs no running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _state
from jaxbn import _stats
from jaxbn import _validation


def fold_into_conv(kernel: jax.typing.ArrayLike, bias: jax.typing.ArrayLike | None,
                   params: _state.BatchNormParams | None,
                   state: _state.BatchNormState, *, epsilon: float = 1e-5,
                   kernel_layout: str = "HWIO") -> tuple[jax.Array, jax.Array]:
  """Folds an inference-mode batch norm that follows a convolution into it.

  For a convolution `conv(x, kernel) + bias` (e.g. `lax.conv_general_dilated`
  or `flax.linen.Conv`) followed by `jaxbn.batch_norm(params, state, ...,
  training=False)` over its output channels, returns `(kernel, bias)` such that
  `conv(x, folded_kernel) + folded_bias` gives the same result. Grouped and
  depthwise convolutions (`feature_group_count > 1`) fold the same way: each
  output channel is scaled on its own.

  Args:
    kernel: convolution weights laid out as `kernel_layout`, e.g. `(H, W, I, O)`
      for 'HWIO' (flax, haiku) or `(O, I, H, W)` for 'OIHW' (PyTorch).
    bias: the convolution's bias of shape `(O,)`, or None if it has none.
    params: the batch norm's `BatchNormParams(scale, bias)` of shape `(O,)`, or
      None for a batch norm without affine transform.
    state: the batch norm's `BatchNormState` (running `mean`, `var` of shape
      `(O,)`) as used in inference mode.
    epsilon: the batch norm's epsilon; it must be the value the batch norm was
      used with, or the folded layer differs from it.
    kernel_layout: a string with one letter per kernel axis: 'O' for output
      channels, 'I' for input channels, any other letters for spatial axes
      (lax's convention: 'HWIO', 'OIHW', 'WIO', 'DHWIO', ...).

  Returns:
    `(folded_kernel, folded_bias)`: the kernel in its layout, shape and dtype;
    the bias of shape `(O,)` in the dtype of `kernel` and `bias` combined.

  Raises:
    TypeError: a non-float `kernel`, or a `kernel_layout` that is not a string.
    ValueError: a malformed `kernel_layout`, a bias or batch norm whose feature
      count differs from the kernel's output channels, or a bad `epsilon`.
  """
  kernel = jnp.asarray(kernel)
  if not isinstance(kernel_layout, str):
    raise TypeError(f"kernel_layout must be a string such as 'HWIO' or 'OIHW', "
                    f"got {kernel_layout!r}.")
  if (len(kernel_layout) != kernel.ndim or kernel_layout.count("O") != 1
      or kernel_layout.count("I") != 1 or len(set(kernel_layout)) != kernel.ndim):
    raise ValueError(
        f"kernel_layout={kernel_layout!r} does not describe a kernel of shape "
        f"{kernel.shape}: expected {kernel.ndim} distinct letters with one 'O' "
        "(output channels) and one 'I' (input channels), e.g. 'HWIO' or 'OIHW'.")
  return _fold(kernel, bias, params, state, epsilon, kernel_layout.index("O"))


def fold_into_dense(kernel: jax.typing.ArrayLike, bias: jax.typing.ArrayLike | None,
                    params: _state.BatchNormParams | None,
                    state: _state.BatchNormState, *,
                    epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Folds an inference-mode batch norm that follows a dense layer into it.

  For `x @ kernel + bias` (as `flax.linen.Dense` / `flax.nnx.Linear`) followed
  by `jaxbn.batch_norm(params, state, ..., training=False, axis=-1)`, returns
  `(kernel, bias)` such that `x @ folded_kernel + folded_bias` gives the same
  result. A PyTorch `nn.Linear` weight is `(out, in)`: pass its transpose.

  Args:
    kernel: weights of shape `(in_features, out_features)`.
    bias: bias of shape `(out_features,)`, or None.
    params: the batch norm's `BatchNormParams` of shape `(out_features,)`, or
      None for no affine transform.
    state: the batch norm's `BatchNormState` of shape `(out_features,)`.
    epsilon: the batch norm's epsilon.

  Returns:
    `(folded_kernel, folded_bias)` of shapes `(in_features, out_features)` and
    `(out_features,)`.

  Raises:
    TypeError: a non-float `kernel`.
    ValueError: `kernel` is not 2-D, shapes disagree, or a bad `epsilon`.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(
        f"kernel must have shape (in_features, out_features), got shape {kernel.shape}.")
  return _fold(kernel, bias, params, state, epsilon, output_axis=1)


def _fold(kernel: jax.Array, bias, params, state, epsilon: float,
          output_axis: int) -> tuple[jax.Array, jax.Array]:
  _validation.check_floating(kernel, "kernel")
  epsilon = _validation.check_epsilon(epsilon)
  num_outputs = kernel.shape[output_axis]
  feature_shape = (num_outputs,)
  if bias is not None:
    bias = jnp.asarray(bias)
    _validation.check_floating(bias, "bias")
    if bias.shape != feature_shape:
      raise ValueError(
          f"bias has shape {bias.shape}, but the kernel of shape {kernel.shape} has "
          f"{num_outputs} output channels (axis {output_axis}); expected {feature_shape}.")
  for tree, tree_name, field_names, type_name in (
      (params, "params", ("scale", "bias"), "BatchNormParams"),
      (state, "state", ("mean", "var"), "BatchNormState")):
    if tree is None and tree_name == "params":
      continue
    for field in field_names:
      value = getattr(tree, field, None)
      if value is None:
        raise ValueError(f"{tree_name}.{field} is missing; pass the batch norm's "
                         f"{type_name} (see jaxbn.init).")
      if tuple(np.shape(value)) != feature_shape:
        raise ValueError(
            f"{tree_name}.{field} has shape {tuple(np.shape(value))}, but the kernel of "
            f"shape {kernel.shape} has {num_outputs} output channels (axis "
            f"{output_axis}); the batch norm must normalize exactly those channels, "
            f"expected {feature_shape}.")

  out_bias_dtype = kernel.dtype if bias is None else jnp.result_type(kernel, bias)
  compute_dtype = jnp.promote_types(out_bias_dtype, jnp.float32)
  multiplier = jax.lax.rsqrt(jnp.asarray(state.var, compute_dtype) + epsilon)
  offset = jnp.zeros(feature_shape, compute_dtype)
  if params is not None:
    multiplier = multiplier * jnp.asarray(params.scale, compute_dtype)
    offset = jnp.asarray(params.bias, compute_dtype)
  centered_bias = -jnp.asarray(state.mean, compute_dtype)
  if bias is not None:
    centered_bias = centered_bias + bias.astype(compute_dtype)
  folded_kernel = kernel.astype(compute_dtype) * multiplier.reshape(
      _stats.feature_broadcast_shape(kernel.shape, (output_axis,)))
  folded_bias = centered_bias * multiplier + offset
  return folded_kernel.astype(kernel.dtype), folded_bias.astype(out_bias_dtype)
