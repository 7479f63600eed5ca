"""`jaxbn.equinox.BatchNorm`: a drop-in replacement for `equinox.nn.BatchNorm`.

Same constructor, fields, state layout and call signature as Equinox's
(`eqx.nn.State` threaded explicitly, `eqx.nn.make_with_state`,
`eqx.nn.inference_mode`, `eqx.nn.Sequential`, one example per call under
`jax.vmap(..., axis_name=...)`, nested vmaps with a tuple of axis names), so
swapping the import keeps a model, its state and its checkpoints::

  from jaxbn import equinox as jaxbn_eqx
  model, state = eqx.nn.make_with_state(jaxbn_eqx.BatchNorm)(64, "batch", mode="batch")
  y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, state)

The arithmetic is `jaxbn`'s (statistics pooled with one count-weighted psum,
accurate variance, closed-form backward), and the two modes are:

* `mode="ema"`: standard batch norm. Training normalizes with the batch
  statistics; `ema_state_index` holds `(running_mean, running_var)`, set to
  the first batch's statistics on the first training call and updated as
  `momentum * old + (1 - momentum) * batch` afterwards: the same numbers
  Equinox stores. Equinox normalizes its training batches with those running
  values instead (from the second call on; equinox#659), which this layer does
  not: its training outputs equal Equinox's on the first call and
  standard batch norm's always. The initial running variance is 1 (Equinox's
  is uninitialized memory), so inference before any training is finite.
* `mode="batch"`: Equinox's zero-debiased scheme, corrected. The state is
  Equinox's (`batch_counter`, `batch_state_index` with hidden mean 0 and
  variance 1 at first), training outputs and states are the same numbers; in
  inference the hidden variance is debiased for its initial value 1
  (`(hidden_var - momentum**t) / (1 - momentum**t)`, the average of the batch
  variances seen) where Equinox divides it by `1 - momentum**t` only, which
  inflates early inference variances by about `momentum**t / (1 - momentum**t)`.

The default `mode` ("legacy") is "ema", as in Equinox, without its warning:
the slowdown it warns about is the EMA-mixed normalization, absent here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from jaxbn import _state
from jaxbn import _normalization
from jaxbn import _microbatch

_MODES = ("ema", "batch", "legacy")


class BatchNorm(eqx.nn.StatefulLayer):
  """Batch normalization with `eqx.nn.BatchNorm`'s interface and jaxbn's numerics.

  Attributes:
    weight: scale, shape `(input_size,)`, or None without `channelwise_affine`.
    bias: shift, shape `(input_size,)`, or None.
    ema_first_time_index: ("ema" mode) `StateIndex` of a bool, True until the
      first training call.
    ema_state_index: ("ema" mode) `StateIndex` of `(running_mean, running_var)`.
    batch_counter: ("batch" mode) `StateIndex` of the number of training calls.
    batch_state_index: ("batch" mode) `StateIndex` of the hidden (not yet
      debiased) `(mean, var)` running averages.
    axis_name: the vmapped axis name(s) to pool statistics over.
    inference: normalize with the running statistics (toggled by
      `eqx.nn.inference_mode`).
    input_size: number of channels (axis 0 of each example).
    eps: added to the variance before the square root.
    channelwise_affine: whether `weight` and `bias` exist.
    momentum: weight of the old running value, in [0, 1).
    mode: "ema" or "batch" (see the module docstring).
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  axis_name: Hashable | Sequence[Hashable]
  inference: bool
  input_size: int = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  mode: Literal["ema", "batch"] = eqx.field(static=True)

  def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable],
               eps: float = 1e-5, channelwise_affine: bool = True,
               momentum: float = 0.99, inference: bool = False, dtype=None,
               mode: Literal["ema", "batch", "legacy"] = "legacy"):
    """Creates the layer; use `eqx.nn.make_with_state(BatchNorm)(...)` for its state.

    Args:
      input_size: number of channels of each example (its axis 0).
      axis_name: name (or tuple/list of names, for nested vmaps) of the
        vmapped batch axis or axes to compute statistics over.
      eps: added to the variance before the square root; > 0.
      channelwise_affine: learn a per-channel `weight` and `bias`.
      momentum: weight of the old running value, in [0, 1).
      inference: start in inference mode.
      dtype: dtype of `weight`, `bias` and the running statistics (default:
        float32, or float64 with `jax_enable_x64`).
      mode: "ema", "batch" or "legacy" (= "ema").

    Raises:
      ValueError: unknown `mode`, or `input_size`, `eps`, `momentum` out of range.
    """
    if mode not in _MODES:
      raise ValueError(f"mode must be 'ema' or 'batch' (or 'legacy', = 'ema'), got {mode!r}.")
    mode = "ema" if mode == "legacy" else mode
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
      raise ValueError(f"input_size must be a positive int, got {input_size!r}.")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not eps > 0:
      raise ValueError(f"eps must be > 0, got {eps!r}.")
    if dtype is None:
      dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    shape = (input_size,)
    if channelwise_affine:
      self.weight = jnp.ones(shape, dtype)
      self.bias = jnp.zeros(shape, dtype)
    else:
      self.weight = None
      self.bias = None
    initial = (jnp.zeros(shape, dtype), jnp.ones(shape, dtype))
    if mode == "ema":
      self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
      self.ema_state_index = eqx.nn.StateIndex(initial)
      self.batch_counter = None
      self.batch_state_index = None
    else:
      self.batch_counter = eqx.nn.StateIndex(jnp.array(0))
      self.batch_state_index = eqx.nn.StateIndex(initial)
      self.ema_first_time_index = None
      self.ema_state_index = None
    self.mode = mode
    self.inference = inference
    self.axis_name = axis_name
    self.input_size = input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum

  def __call__(self, x: jax.Array, state: eqx.nn.State, *, key=None,
               inference: bool | None = None) -> tuple[jax.Array, eqx.nn.State]:
    """Normalizes one example (call it under `jax.vmap` with `axis_name`).

    Args:
      x: one example, `(input_size, dim_1, ..., dim_N)`; statistics per channel
        over the spatial dims and the vmapped axes named by `axis_name`.
      state: the `eqx.nn.State` holding the running statistics.
      key: ignored (Equinox's layer signature).
      inference: overrides `self.inference` for this call when not None.

    Returns:
      `(y, new_state)`: `y` of `x`'s shape, in the dtype of `x` promoted with
      the parameters' (as Equinox); the state updated in training.

    Raises:
      NameError: `axis_name` is not bound by an enclosing vmap (training).
      ValueError: `x`'s axis 0 is not `input_size`.
    """
    del key
    if inference is None:
      inference = self.inference
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] != self.input_size:
      raise ValueError(
          f"x must be one example of shape (input_size={self.input_size}, ...) "
          f"(call the layer under jax.vmap over the batch), got shape {x.shape}.")
    with jax.named_scope("jaxbn.equinox.BatchNorm"):
      if self.mode == "ema":
        return self._ema(x, state, inference)
      return self._batch(x, state, inference)

  def _params(self):
    if not self.channelwise_affine:
      return None
    return _state.BatchNormParams(scale=self.weight, bias=self.bias)

  def _parse(self, x, state_like, *, training: bool):
    # Equinox's output dtype: the input's promoted with the parameters' and,
    # in inference, with the running statistics'.
    dtypes = [x.dtype] + ([self.weight.dtype] if self.channelwise_affine else [])
    out_dtype = jnp.result_type(*dtypes, *([] if training else [state_like.mean.dtype]))
    return _normalization.parse_call(
        self._params(), state_like, x.astype(out_dtype), axis=0, momentum=self.momentum,
        epsilon=self.eps, axis_name=self.axis_name if training else None,
        axis_index_groups=None, mask=None)

  def _normalize_running(self, x, mean, var):
    state_like = _state.BatchNormState(mean=mean, var=var,
                                            count=jnp.zeros((), jnp.int32))
    call = self._parse(x, state_like, training=False)
    return _normalization.normalize_with_running_stats(call, state_like)

  def _ema(self, x, state, inference):
    running_mean, running_var = state.get(self.ema_state_index)
    if inference:
      return self._normalize_running(x, running_mean, running_var), state
    first_time = state.get(self.ema_first_time_index)
    state = state.set(self.ema_first_time_index, jnp.array(False))
    running = _state.BatchNormState(mean=running_mean, var=running_var,
                                         count=jnp.zeros((), jnp.int32))
    call = self._parse(x, running, training=True)
    y, moments = _microbatch.training_moments(call, running, single_value_ok=True,
                                              countless_state=True)
    updated = _microbatch.update_stats(running, moments, momentum=self.momentum)
    new_mean = jnp.where(first_time, moments.mean, updated.mean).astype(running_mean.dtype)
    new_var = jnp.where(first_time, moments.var, updated.var).astype(running_var.dtype)
    state = state.set(self.ema_state_index, (new_mean, new_var))
    return y, state

  def _batch(self, x, state, inference):
    counter = state.get(self.batch_counter)
    hidden_mean, hidden_var = state.get(self.batch_state_index)
    if inference:
      mean, var = debiased_statistics(hidden_mean, hidden_var, counter, self.momentum)
      return self._normalize_running(x, mean, var), state
    hidden = _state.BatchNormState(mean=hidden_mean, var=hidden_var,
                                        count=counter.astype(jnp.int32))
    call = self._parse(x, hidden, training=True)
    y, moments = _microbatch.training_moments(call, hidden, single_value_ok=True,
                                              countless_state=False)
    updated = _microbatch.update_stats(hidden, moments, momentum=self.momentum)
    state = state.set(self.batch_counter, counter + 1)
    state = state.set(self.batch_state_index,
                      (updated.mean.astype(hidden_mean.dtype),
                       updated.var.astype(hidden_var.dtype)))
    return y, state


def debiased_statistics(hidden_mean: jax.Array, hidden_var: jax.Array, counter: jax.Array,
                        momentum: float) -> tuple[jax.Array, jax.Array]:
  """Inference statistics of "batch" mode from Equinox's hidden averages.

  After `t` updates from hidden `(0, 1)`, `hidden_mean = (1 - m**t) * M` and
  `hidden_var = m**t + (1 - m**t) * V`, with `M`, `V` the EMA-weighted
  averages of the batch means and variances; this returns `(M, V)` (and the
  hidden values themselves before any update).

  Args:
    hidden_mean, hidden_var: `batch_state_index`'s values, `(input_size,)`.
    counter: `batch_counter`'s value, the number of training calls `t`.
    momentum: the layer's momentum `m`.
  """
  decay = jnp.power(jnp.asarray(momentum, jnp.float32), counter.astype(jnp.float32))
  started = counter > 0
  weight = jnp.where(started, 1.0 - decay, 1.0)
  mean = hidden_mean / weight.astype(hidden_mean.dtype)
  var = jnp.where(started, jnp.maximum(hidden_var - decay.astype(hidden_var.dtype), 0)
                  / weight.astype(hidden_var.dtype), hidden_var)
  return mean, var
