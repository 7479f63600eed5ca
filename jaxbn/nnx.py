"""`jaxbn.nnx.BatchNorm`: a drop-in replacement for `flax.nnx.BatchNorm`.

Same constructor, call signature and variables as flax's (`Param`s `scale`,
`bias`; `BatchStat`s `mean`, `var`), and it follows `model.train()`,
`model.eval()` and `nnx.view(model, use_running_average=...)`, so an existing
model and its checkpoints keep working after swapping the import::

  from jaxbn import nnx as jaxbn_nnx
  self.norm = jaxbn_nnx.BatchNorm(64, momentum=0.9, rngs=rngs)

The arithmetic is `jaxbn.batch_norm`'s; see `jaxbn.linen` for what that
changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _activation
from jaxbn import _flax_adapter
from jaxbn import _flax_stats
from jaxbn import _validation

Initializer = Any


class BatchMoments(nnx.Variable):
  """A layer's microbatch accumulator (see `BatchNorm`'s `accumulate_moments`)."""


class BatchNorm(nnx.Module):
  """Batch normalization with flax.nnx.BatchNorm's interface and jaxbn's numerics.

  Args:
    num_features: number of features: the size of the feature axis (or the
      product of the sizes of the feature axes when `axis` is a tuple).
    use_running_average: True normalizes with the stored statistics
      (inference); False with the batch's, updating the stored ones. Switched
      by `model.eval()` / `model.train()`; a value given at call time wins.
    axis: feature axis or axes of the input (NHWC: -1).
    momentum: weight of the old running value (PyTorch's 0.1 is 0.9 here),
      in [0, 1).
    epsilon: added to the variance before the square root.
    dtype: dtype of the computation and result (default: inferred from the
      input and parameters by `promote_dtype`).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: add a learned `bias` (beta).
    use_scale: multiply by a learned `scale` (gamma).
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: mapped axis name(s) (`jax.vmap` / `jax.shard_map`) over which
      batch statistics are pooled; not needed under `jax.jit` over sharded
      arrays.
    axis_index_groups: optional equal-size groups of replica indices of
      `axis_name`; each group is normalized with its own statistics.
    use_fast_variance: accepted for compatibility, no effect: jaxbn's variance
      is always the accurate one.
    promote_dtype: as flax's: maps `(x, mean, var, scale, bias)` and `dtype=`
      to promoted arrays; the promoted `x`, `scale`, `bias` are used, while the
      running statistics stay float32 for the computation.
    force_float32_reductions: accepted for signature parity with
      `jaxbn.linen.BatchNorm`, no effect: nnx stores float32 statistics and
      jaxbn reduces in at least float32.
    rngs: `nnx.Rngs`; the `params` stream initializes `scale`, then `bias`.
    bias_metadata: metadata of the `bias` Param.
    scale_metadata: metadata of the `scale` Param.
    activation: None (default, flax's layer), or "relu", "leaky_relu" or
      "identity" applied to the output (`jaxbn.batch_norm_activation`).
    negative_slope: leaky ReLU's slope for negative inputs.
    memory_saving: InPlace-ABN: the training backward pass keeps only the
      output, not the input; needs `activation="leaky_relu"` (slope > 0) or
      "identity", and uses `|scale| + epsilon` as the scale.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int | tuple[int, ...] = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: str | tuple[str, ...] | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Any = nnx_dtypes.promote_dtype,
      force_float32_reductions: bool = True,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
      activation: str | None = None,
      negative_slope: float = 0.01,
      memory_saving: bool = False,
  ):
    _activation.check_activation(activation, negative_slope, memory_saving)
    feature_shape = _validation.feature_shape_of(num_features)
    if len(feature_shape) != 1 or not isinstance(num_features, (int, np.integer)):
      raise ValueError(
          f"num_features must be a positive int (flax.nnx's convention; the "
          f"product of the feature sizes for a tuple axis), got {num_features!r}.")
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    # The rng draws happen in flax's order (scale, then bias) so that the same
    # Rngs initialize both modules identically.
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                             **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                            **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = int(num_features)
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions
    self.activation = activation
    self.negative_slope = negative_slope
    self.memory_saving = memory_saving
    self.accumulate_moments = False
    self.batch_moments: BatchMoments | None = nnx.data(None)

  def __call__(self, x: jax.typing.ArrayLike, use_running_average: bool | None = None,
               *, mask: jax.typing.ArrayLike | None = None,
               shortcut: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Normalizes `x` per feature, updating the running statistics in training.

    Args:
      x: floating-point input, e.g. `(N, H, W, C)`.
      use_running_average: overrides the attribute for this call.
      mask: optional array broadcastable to `x`, True (or 1) where an element
        counts toward the batch statistics; all elements are normalized.
      shortcut: optional array of `x`'s shape added before the activation
        (`act(bn(x) + shortcut)`, a residual block's end); see
        `jaxbn.batch_norm_activation`.

    Returns:
      The normalized input, of `x`'s shape.

    Raises:
      ValueError: neither the attribute nor the argument sets
        `use_running_average`, or the feature axes of `x` do not hold
        `num_features` values; and `jaxbn.batch_norm`'s errors.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "No use_running_average was given to BatchNorm: pass it to the "
          "constructor, to __call__, or switch with model.train() / model.eval().")
    x, feature_axes, _, feature_shape = _validation.parse_input(
        x, self.axis, require_floating=False)
    if int(np.prod(feature_shape)) != self.num_features:
      raise ValueError(
          f"x of shape {x.shape} has feature shape {feature_shape} on axis="
          f"{self.axis!r}, which does not hold num_features={self.num_features} "
          "values.")
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)

    def to_features(value):
      return None if value is None else value.reshape(feature_shape)

    start_mean, start_var = to_features(self.mean[...]), to_features(self.var[...])
    accumulate = self.accumulate_moments and not use_running_average
    pooled = None
    if accumulate:
      if self.batch_moments is None:
        self.batch_moments = BatchMoments(_flax_adapter.empty_accumulator(feature_shape))
      start_mean, start_var, pooled = _flax_adapter.accumulator_inputs(
          self.batch_moments.get_value(), start_mean, start_var)
    result = _flax_adapter.batch_norm(
        x, to_features(scale), to_features(bias), start_mean, start_var,
        use_running_average=use_running_average,
        initializing=False, feature_axes=feature_axes, momentum=self.momentum,
        epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask, out_dtype=x.dtype,
        activation=self.activation, negative_slope=self.negative_slope,
        memory_saving=self.memory_saving, pooled=pooled, shortcut=shortcut)
    if result.mean is not None:
      self.mean[...] = result.mean.reshape(self.mean[...].shape)
      self.var[...] = result.var.reshape(self.var[...].shape)
    if accumulate:
      self.batch_moments.set_value(_flax_adapter.next_accumulator(
          self.batch_moments.get_value(), result, start_mean, start_var))
    return result.y

  def set_view(self, use_running_average: bool | None = None,
               accumulate_moments: bool | None = None):
    """Sets attributes for `nnx.view`.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
      accumulate_moments: if True, training calls pool their batch moments
        in `batch_moments` and set the running statistics to one update from
        the step's starting ones with the pooled moments (microbatches; see
        `jaxbn.linen.BatchNorm`); `reset_moments` starts the next step.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
    if accumulate_moments is not None:
      self.accumulate_moments = accumulate_moments


def reset_moments(model: nnx.Module) -> None:
  """Empties the microbatch accumulators of every `BatchNorm` in `model` (in place).

  Call it after the step's last microbatch: the next training call in
  accumulation mode then starts a new step from the current running
  statistics.
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, BatchNorm):
      module.batch_moments = nnx.data(None)


recompute_stats = _flax_stats.nnx_recompute_stats
sync_stats = _flax_stats.sync_stats
