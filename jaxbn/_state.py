"""Batch-norm parameters and running statistics: the NamedTuple pytrees and `init`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _validation


class BatchNormParams(NamedTuple):
  """Trainable affine parameters.

  Attributes:
    scale: gamma, shape `feature_shape`, initialized to ones.
    bias: beta, shape `feature_shape`, initialized to zeros.
  """
  scale: jax.Array
  bias: jax.Array


class BatchNormState(NamedTuple):
  """Running statistics used in inference mode (never trained by gradients).

  Attributes:
    mean: running mean, float32, shape `feature_shape`, initialized to zeros.
    var: running variance, float32, shape `feature_shape`, initialized to ones.
    count: int32 scalar, the number of training-mode updates folded in.
  """
  mean: jax.Array
  var: jax.Array
  count: jax.Array


class BatchStatisticsProbe(BatchNormState):
  """A state whose training-mode update records the batch statistics.

  `jaxbn.recompute_stats` threads these through a model in place of its
  `BatchNormState`s: every jaxbn layer that receives one returns the mean and
  variance of its current batch (what momentum=0 would store, including the
  `unbiased_running_var` correction) instead of a running average, and
  `count + 1`; a feature with no valid element in the batch returns
  `var = -1`. Being a distinct pytree type, it also retraces a jitted model.
  """
  __slots__ = ()


def is_state(node) -> bool:
  """Whether a pytree node is a `BatchNormState` (treat it as a leaf)."""
  return isinstance(node, BatchNormState)


def states_in(tree) -> list[BatchNormState]:
  """The `BatchNormState`s of a pytree, in leaf order."""
  return [leaf for leaf in jax.tree.leaves(tree, is_leaf=is_state) if is_state(leaf)]


def replace_states(tree, new_states):
  """`tree` with its `BatchNormState`s (in `states_in` order) replaced by `new_states`."""
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_state)
  replacements = iter(new_states)
  return treedef.unflatten([next(replacements) if is_state(leaf) else leaf
                            for leaf in leaves])


def init(num_features: int | tuple[int, ...], *,
         dtype=jnp.float32) -> tuple[BatchNormParams, BatchNormState]:
  """Creates batch-norm parameters and running statistics.

  Args:
    num_features: size of the feature axis (int) or the shape of the feature
      axes (tuple), e.g. `C` for NHWC activations normalized per channel.
    dtype: dtype of `scale` and `bias`. The state is always float32.

  Returns:
    `(params, state)`: `BatchNormParams(scale=ones, bias=zeros)` and
    `BatchNormState(mean=zeros, var=ones, count=0)`.

  Raises:
    ValueError: `num_features` is not a positive int or tuple of them.

  Examples:
    >>> import jax.numpy as jnp, jaxbn
    >>> params, state = jaxbn.init(3)
    >>> params.scale.tolist(), params.bias.tolist()
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    >>> state.mean.tolist(), state.var.tolist(), int(state.count)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    >>> params, state = jaxbn.init((4, 3), dtype=jnp.bfloat16)  # two feature axes
    >>> params.scale.dtype, state.mean.dtype, state.mean.shape
    (dtype(bfloat16), dtype('float32'), (4, 3))
  """
  shape = _validation.feature_shape_of(num_features)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}.")
  params = BatchNormParams(scale=jnp.ones(shape, dtype), bias=jnp.zeros(shape, dtype))
  state = BatchNormState(mean=jnp.zeros(shape, jnp.float32),
                         var=jnp.ones(shape, jnp.float32),
                         count=jnp.zeros((), jnp.int32))
  return params, state
