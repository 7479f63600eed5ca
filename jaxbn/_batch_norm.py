"""`batch_norm`: batch normalization as a pure function over NamedTuple pytrees.

Training mode normalizes with the statistics of the (global) batch and returns
updated running statistics; inference mode normalizes with the running
statistics. The machinery it shares with the other variants (argument parsing,
statistics, the closed-form `jax.custom_vjp` backward pass, the state update)
is in `_normalization`; the pytrees and `init` in `_state`.
"""

from __future__ import annotations

import jax

from jaxbn import _normalization
from jaxbn import _state
from jaxbn import _validation
from jaxbn._validation import Axis, AxisIndexGroups, AxisName, Mask


def batch_norm(params: _state.BatchNormParams | None, state: _state.BatchNormState,
               x: jax.typing.ArrayLike, *, training: bool, axis: Axis = -1,
               momentum: float | None = 0.99, epsilon: float = 1e-5,
               axis_name: AxisName | None = None,
               axis_index_groups: AxisIndexGroups | None = None, mask: Mask | None = None,
               unbiased_running_var: bool = False) -> tuple[jax.Array, _state.BatchNormState]:
  """Batch normalization: `y = scale * (x - mean) / sqrt(var + epsilon) + bias`.

  Statistics are per feature: every axis of `x` except `axis` is reduced, so
  NHWC convolution activations with `axis=-1` get one mean and variance per
  channel over batch x height x width.

  Args:
    params: `_state.BatchNormParams(scale, bias)` of shape `feature_shape`, or None
      for no affine transform.
    state: `_state.BatchNormState(mean, var, count)` of running statistics.
    x: floating-point input, e.g. `(N, H, W, C)` or `(N, C)`.
    training: True normalizes with the batch mean and biased variance and
      returns updated running statistics; False normalizes with `state` and
      returns it unchanged. Must be a Python bool.
    axis: feature axis or axes (int or tuple; negative allowed). NCHW is 1.
    momentum: weight of the old running value: `new = momentum * old +
      (1 - momentum) * batch` (flax's convention; PyTorch's 0.1 is 0.9 here).
      None: cumulative average over all training steps (PyTorch's None).
    epsilon: added to the variance before the square root; > 0.
    axis_name: mapped axis name or tuple of names (vmap / shard_map) over
      which statistics are pooled with one count-weighted psum.
    axis_index_groups: optional equal-size partition of the replicas of
      `axis_name`; each group pools its own statistics.
    mask: optional boolean array broadcastable to `x`; only True elements count
      toward the statistics, every element is normalized.
    unbiased_running_var: store `n / (n - 1)` times the batch variance in the
      running variance (PyTorch; the BN paper's inference estimate).

  Returns:
    `(y, new_state)`: `y` of `x`'s shape and dtype; `new_state` float32.
    Masked-out elements are normalized like the others, but nothing they hold
    (NaN, inf) reaches the valid outputs, the state or the gradients of the
    valid elements and of `params` (for cotangents that are 0 on masked-out
    outputs, i.e. a loss that ignores them). A feature with no valid element
    is normalized with the running statistics, and its running statistics do
    not change.

  Raises:
    TypeError: non-float `x`, non-bool `mask` or `training`.
    ValueError: bad `axis`, `epsilon`, `momentum`, `axis_index_groups`, mask
      shape, params/state shapes, or only one value per feature in training.
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> params, state = jaxbn.init(2)
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (batch, features)
    >>> y, state = jaxbn.batch_norm(params, state, x, training=True)
    >>> y.round(3).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    >>> [round(float(m), 6) for m in state.mean], int(state.count)  # 0.01 * batch mean
    ([0.02, 0.2], 1)
    >>> y_eval, same = jaxbn.batch_norm(params, state, x, training=False)
    >>> same is state
    True

    NCHW activations name their channel axis, and `training` is static under
    `jax.jit`:

    >>> params, state = jaxbn.init(16)
    >>> step = jax.jit(jaxbn.batch_norm, static_argnames=("training", "axis"))
    >>> y, state = step(params, state, jnp.ones((8, 16, 5, 5)), training=True, axis=1)
    >>> y.shape, state.mean.shape
    ((8, 16, 5, 5), (16,))
  """
  training = _validation.check_training(training)
  call = _normalization.parse_call(
      params, state, x, axis=axis, momentum=momentum, epsilon=epsilon, axis_name=axis_name,
      axis_index_groups=axis_index_groups, mask=mask)
  if not training:
    return _normalization.normalize_with_running_stats(call, state), state
  return _normalization.normalize_in_training(
      call, state, unbiased_running_var=unbiased_running_var, single_value_ok=False,
      countless_state=False)
