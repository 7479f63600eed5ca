"""Conversion between jaxbn pytrees and PyTorch BatchNorm state dicts.

PyTorch is only needed by `to_torch`; it is imported there, never at module
import. `from_torch` accepts anything NumPy can read (torch tensors included).

The conventions differ in two ways that matter when training continues:

* momentum: PyTorch's `momentum` is the weight of the NEW batch value
  (default 0.1); jaxbn's is the weight of the OLD running value (default 0.99).
  Use `jaxbn momentum = 1 - torch momentum` (torch 0.1 -> 0.9 here);
  torch `momentum=None` (cumulative average) is `momentum=None` here, and it
  counts steps in `num_batches_tracked`, which maps to `state.count`.
* running variance: PyTorch stores the unbiased `n / (n - 1)` batch variance;
  pass `unbiased_running_var=True` to `jaxbn.batch_norm` to continue the same
  way. Inference-mode outputs are the same formula in both libraries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbn import _state

_PARAM_KEYS = ("weight", "bias")
_STATE_KEYS = ("running_mean", "running_var")
_COUNT_KEY = "num_batches_tracked"
_INT32_MAX = np.iinfo(np.int32).max


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A NumPy copy of a torch tensor (any device, bfloat16 too) or array-like.

  A copy, not a view: JAX may alias host memory on CPU, and torch updates its
  running statistics in place, which would silently change the jaxbn state.
  """
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      # NumPy has no bfloat16 of its own; ml_dtypes' (used by JAX) holds it exactly.
      return value.float().numpy().astype(jnp.bfloat16)
    value = value.numpy()
  try:
    return np.array(value)
  except (TypeError, ValueError) as error:
    raise TypeError(
        f"state_dict[{key!r}] must be a torch tensor or an array, got "
        f"{type(value).__name__}.") from error


def from_torch(state_dict: Mapping[str, Any]
               ) -> tuple[_state.BatchNormParams | None, _state.BatchNormState]:
  """Converts a PyTorch BatchNorm state dict to jaxbn `(params, state)`.

  Works for `torch.nn.BatchNorm1d/2d/3d` and `SyncBatchNorm`. Select a layer's
  own keys (`model.bn1.state_dict()`), not the whole model's. PyTorch
  normalizes channels on axis 1 (NCHW), so call
  `jaxbn.batch_norm(..., axis=1)` on NCHW input, or transpose to NHWC and use
  the default `axis=-1`. To keep training with PyTorch's update rule, use
  `momentum=1 - torch_momentum` and `unbiased_running_var=True`.

  Args:
    state_dict: mapping with `running_mean`, `running_var` (shape `(C,)`),
      optionally `num_batches_tracked` (scalar; missing in checkpoints older
      than PyTorch 0.4.1, read as 0), and `weight`, `bias` (shape `(C,)`)
      unless the layer was built with `affine=False`. Values may be torch
      tensors on any device or arrays.

  Returns:
    `(params, state)`: `BatchNormParams(scale=weight, bias=bias)` in the
    weights' dtype, or None without affine weights; `BatchNormState` with
    float32 `mean`, `var` and int32 `count = num_batches_tracked`.

  Raises:
    TypeError: `state_dict` is not a mapping, or a value is not array-like.
    ValueError: missing or unexpected keys, only one of weight/bias, shapes
      that are not one `(C,)` for all entries, or non-float statistics.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        f"state_dict must be a mapping such as module.state_dict(), got "
        f"{type(state_dict).__name__}.")
  keys = set(state_dict)
  missing = [k for k in _STATE_KEYS if k not in keys]
  if missing:
    raise ValueError(
        f"state_dict is missing {missing}; a BatchNorm built with "
        "track_running_stats=False has no running statistics to convert. Got keys "
        f"{sorted(keys)}.")
  unexpected = sorted(keys - set(_PARAM_KEYS + _STATE_KEYS + (_COUNT_KEY,)))
  if unexpected:
    raise ValueError(
        f"state_dict has unexpected keys {unexpected}; pass one BatchNorm layer's "
        "state_dict (e.g. model.bn1.state_dict()), whose keys are weight, bias, "
        "running_mean, running_var, num_batches_tracked.")
  affine = [k for k in _PARAM_KEYS if k in keys]
  if len(affine) == 1:
    raise ValueError(
        f"state_dict has {affine[0]!r} but not "
        f"{({'weight', 'bias'} - set(affine)).pop()!r}; a BatchNorm has both or neither.")

  arrays = {k: _to_numpy(state_dict[k], k) for k in _PARAM_KEYS + _STATE_KEYS if k in keys}
  shape = arrays["running_mean"].shape
  if len(shape) != 1:
    raise ValueError(f"state_dict['running_mean'] must have shape (C,), got {shape}.")
  for key, array in arrays.items():
    if array.shape != shape:
      raise ValueError(
          f"state_dict[{key!r}] has shape {array.shape}, but running_mean has shape "
          f"{shape}; every entry must have shape (C,).")
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(
          f"state_dict[{key!r}] must be floating point, got dtype {array.dtype}.")

  count = 0
  if _COUNT_KEY in keys:
    count_array = _to_numpy(state_dict[_COUNT_KEY], _COUNT_KEY)
    if count_array.size != 1 or not jnp.issubdtype(count_array.dtype, jnp.integer):
      raise ValueError(
          f"state_dict[{_COUNT_KEY!r}] must be an integer scalar, got shape "
          f"{count_array.shape} and dtype {count_array.dtype}.")
    # jaxbn counts in int32; beyond 2**31 - 1 steps the count only matters to
    # momentum=None, where 1 / count is already below float32 resolution.
    count = min(int(count_array.reshape(())), _INT32_MAX)

  params = None
  if affine:
    params = _state.BatchNormParams(scale=jnp.asarray(arrays["weight"]),
                                         bias=jnp.asarray(arrays["bias"]))
  state = _state.BatchNormState(
      mean=jnp.asarray(arrays["running_mean"], jnp.float32),
      var=jnp.asarray(arrays["running_var"], jnp.float32),
      count=jnp.asarray(count, jnp.int32))
  return params, state


def to_torch(params: _state.BatchNormParams | None,
             state: _state.BatchNormState) -> dict[str, Any]:
  """Converts jaxbn `(params, state)` to a PyTorch BatchNorm state dict.

  The result loads with `torch.nn.BatchNorm2d(C).load_state_dict(...)` (or 1d,
  3d; use `affine=False` when `params` is None). The running statistics in
  `state` are used as they are: if they were trained with the default
  `unbiased_running_var=False`, the running variance is the biased estimate,
  a factor `(n - 1) / n` below what PyTorch would have stored.

  Args:
    params: `BatchNormParams(scale, bias)` of shape `(C,)`, or None.
    state: `BatchNormState(mean, var, count)` of shape `(C,)`.

  Returns:
    A dict of CPU torch tensors with keys `weight`, `bias` (if `params`),
    `running_mean`, `running_var` (float32) and `num_batches_tracked` (int64
    scalar), in PyTorch's order.

  Raises:
    ImportError: PyTorch is not installed.
    ValueError: the entries are not all of one shape `(C,)`.
  """
  try:
    import torch
  except ImportError as error:
    raise ImportError(
        "jaxbn.to_torch needs PyTorch, which jaxbn does not install; install it "
        "with `pip install torch` (from_torch works without it).") from error

  entries = {}
  if params is not None:
    entries["weight"] = params.scale
    entries["bias"] = params.bias
  entries["running_mean"] = state.mean
  entries["running_var"] = state.var
  shape = np.shape(state.mean)
  for key, value in entries.items():
    if len(shape) != 1 or np.shape(value) != shape:
      raise ValueError(
          f"to_torch needs every entry of shape (C,); {key} has shape "
          f"{np.shape(value)} and state.mean has shape {shape}.")

  def to_tensor(value) -> Any:
    array = np.asarray(value)
    if array.dtype == jnp.bfloat16:
      return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))  # a writable copy torch can own

  state_dict = {key: to_tensor(value) for key, value in entries.items()}
  state_dict["num_batches_tracked"] = torch.tensor(int(np.asarray(state.count)),
                                                   dtype=torch.int64)
  return state_dict
