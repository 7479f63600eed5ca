"""`jaxbn.linen.BatchNorm`: a drop-in replacement for `flax.linen.BatchNorm`.

Same attributes, call signature, variable names and collections as flax's
(`params`: `scale`, `bias`; `batch_stats`: `mean`, `var`), so an existing model
and its checkpoints keep working after swapping the import::

  from jaxbn import linen as jaxbn_linen
  norm = jaxbn_linen.BatchNorm(use_running_average=not train, momentum=0.9)

What changes is the arithmetic, which is `jaxbn.batch_norm`'s: accurate
statistics whatever `use_fast_variance` says, count-weighted statistics under
`axis_name` with `mask`, one cross-replica reduction in the forward pass and
one in the closed-form backward pass, running statistics that never take NaN,
masked-out slots that may hold NaN or inf, and a feature without any valid
element normalized with the running statistics (flax: NaN). Like flax, a
training batch with one value per feature has variance 0. See
`jaxbn._flax_adapter` for how the variance shift is chosen without a step
counter.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from jaxbn import _flax_adapter
from jaxbn import _flax_stats
from jaxbn import _validation

Initializer = Any

# The collection where a training call accumulates its batch moments when the
# collection is mutable (see `BatchNorm` and `pooled_batch_stats`).
MOMENTS_COLLECTION = "batch_moments"


def pooled_batch_stats(batch_moments) -> Any:
  """The full batch's statistics from a `batch_moments` collection, as `batch_stats`.

  After a first pass over a step's microbatches with `batch_moments` mutable,
  `model.apply({"params": params, "batch_stats": pooled_batch_stats(moments)},
  microbatch, use_running_average=True)` normalizes every microbatch with the
  pooled statistics of all of them (a second pass; see docs/microbatch.md).

  Args:
    batch_moments: the `batch_moments` collection (any nesting of layers).

  Returns:
    The same nesting with each layer's `{"mean", "var"}` (float32); a feature
    no microbatch had a valid element of keeps the step's starting statistics.
  """
  return jax.tree.map(lambda layer: _flax_adapter.pooled_statistics(layer["moments"]),
                      batch_moments, is_leaf=_is_layer_moments)


def _is_layer_moments(node) -> bool:
  return (isinstance(node, dict) and set(node) == {"moments"}
          and _flax_adapter.is_accumulator(node["moments"]))


class BatchNorm(nn.Module):
  """Batch normalization with flax.linen.BatchNorm's interface and jaxbn's numerics.

  Attributes:
    use_running_average: True normalizes with the stored `batch_stats`
      (inference); False with the statistics of the batch, updating
      `batch_stats` (which must be mutable). Set here or in `__call__`.
    axis: feature axis or axes of the input (NHWC: -1).
    momentum: weight of the old running value (flax/jaxbn convention; PyTorch's
      momentum 0.1 is 0.9 here), in [0, 1).
    epsilon: added to the variance before the square root.
    dtype: dtype of the result (default: inferred from input and params).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: add a learned `bias` (beta).
    use_scale: multiply by a learned `scale` (gamma).
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: mapped axis name(s) (`jax.vmap` / `jax.shard_map`) over which
      batch statistics are pooled. Not needed under `jax.jit` over sharded
      arrays. Ignored during `init`, as in flax (flax#1250), so `model.init`
      works outside the mapped context.
    axis_index_groups: optional equal-size groups of replica indices of
      `axis_name`; each group is normalized with its own statistics.
    use_fast_variance: accepted for compatibility, no effect: jaxbn's variance
      is always the accurate one.
    force_float32_reductions: True (default) keeps `batch_stats` in float32;
      False stores them in `param_dtype`, as flax does. jaxbn reduces in at
      least float32 either way.
    activation: None (default, flax's layer), or "relu", "leaky_relu" or
      "identity" applied to the output (`jaxbn.batch_norm_activation`).
    negative_slope: leaky ReLU's slope for negative inputs.
    memory_saving: InPlace-ABN: the training backward pass keeps only the
      output, not the input; needs `activation="leaky_relu"` (slope > 0) or
      "identity", and uses `|scale| + epsilon` as the scale (see
      docs/activation.md).
  """
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: str | tuple[str, ...] | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  activation: str | None = None
  negative_slope: float = 0.01
  memory_saving: bool = False

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, use_running_average: bool | None = None,
               *, mask: jax.typing.ArrayLike | None = None,
               shortcut: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Normalizes `x` per feature.

    During `init` the running statistics are not updated (flax's behaviour),
    so the init input need not match the data, and `axis_name` need not be
    bound.

    Args:
      x: floating-point input, e.g. `(N, H, W, C)`.
      use_running_average: as the attribute; exactly one of the two must be
        set (flax's `merge_param` rule).
      mask: optional array broadcastable to `x`, True (or 1) where an element
        counts toward the batch statistics; all elements are normalized.
      shortcut: optional array of `x`'s shape added before the activation
        (`act(bn(x) + shortcut)`, a residual block's end); see
        `jaxbn.batch_norm_activation`.

    Microbatches: in training, when the `batch_moments` collection is mutable
    (`mutable=["batch_stats", "batch_moments"]`), the layer pools this batch's
    moments with those already in `batch_moments` (created empty on first
    use) and sets `batch_stats` to one running-average update, from the
    statistics the step started with, with the pooled moments. After k
    microbatches `batch_stats` is what one call on their concatenation
    would give; whether `batch_stats` is threaded between the calls or not.
    Drop (or re-create empty) `batch_moments` before the next step.

    Returns:
      The normalized input, of `x`'s shape.
    """
    use_running_average = nn.merge_param("use_running_average",
                                         self.use_running_average, use_running_average)
    x, feature_axes, _, feature_shape = _validation.parse_input(
        x, self.axis, require_floating=False)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    running_mean = self.variable("batch_stats", "mean",
                                 lambda s: jnp.zeros(s, stats_dtype), feature_shape)
    running_var = self.variable("batch_stats", "var",
                                lambda s: jnp.ones(s, stats_dtype), feature_shape)
    scale = bias = None
    if self.use_scale:
      scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype)

    initializing = self.is_initializing()
    # Microbatch accumulation: see `jaxbn.linen` and docs/microbatch.md.
    accumulate = (not use_running_average and not initializing
                  and self.is_mutable_collection(MOMENTS_COLLECTION))
    start_mean, start_var, pooled = running_mean.value, running_var.value, None
    if accumulate:
      moments = self.variable(MOMENTS_COLLECTION, "moments",
                              _flax_adapter.empty_accumulator, feature_shape)
      start_mean, start_var, pooled = _flax_adapter.accumulator_inputs(
          moments.value, start_mean, start_var)
    result = _flax_adapter.batch_norm(
        x, scale, bias, start_mean, start_var,
        use_running_average=use_running_average, initializing=initializing,
        feature_axes=feature_axes, momentum=self.momentum, epsilon=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask,
        out_dtype=flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype),
        activation=self.activation, negative_slope=self.negative_slope,
        memory_saving=self.memory_saving, pooled=pooled, shortcut=shortcut)
    if result.mean is not None:
      running_mean.value = result.mean
      running_var.value = result.var
    if accumulate:
      moments.value = _flax_adapter.next_accumulator(moments.value, result, start_mean,
                                                     start_var)
    y = result.y
    return y


def recompute_stats(module: nn.Module, variables, batches, *, num_batches: int | None = None,
                    **apply_kwargs):
  """PreciseBN over a linen model's `batch_stats`; see `jaxbn._flax_stats`.

  Example: `variables = jaxbn.linen.recompute_stats(model, variables, batches,
  num_batches=100, train=True)`.
  """
  return _flax_stats.linen_recompute_stats(module, variables, batches,
                                           num_batches=num_batches, **apply_kwargs)


sync_stats = _flax_stats.sync_stats
