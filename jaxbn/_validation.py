"""Argument checks and input parsing shared by every jaxbn entry point.

Each check runs at trace time on static information (shapes, dtypes, Python
numbers), so a bad call fails before anything is compiled, with a message that
names the argument and what was expected. Every module parses `(x, axis)` with
`parse_input` and `num_features` with `feature_shape_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
import numbers
import sys
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# The types of the arguments every public function shares.
Axis = int | Sequence[int]  # feature axis or axes of `x`; negative values allowed
AxisName = str | tuple[str, ...]  # mapped axis name(s) of vmap / shard_map
AxisIndexGroups = Sequence[Sequence[int]]  # equal-size groups of replica indices
Mask = jax.typing.ArrayLike  # boolean, broadcastable to `x`; True elements count

# Below this, `momentum` is more likely PyTorch's convention than a deliberate choice.
SUSPICIOUS_MOMENTUM = 0.5


class MomentumWarning(UserWarning):
  """A batch-norm `momentum` in (0, 0.5): probably PyTorch's convention.

  jaxbn's `momentum` is the weight of the old running value (flax's and Keras'
  convention); PyTorch's is the weight of the new one, so PyTorch's
  `momentum=0.1` is `momentum=0.9` here. Where a small momentum is meant,
  silence the warning with
  `warnings.filterwarnings("ignore", category=jaxbn.MomentumWarning)`.
  `momentum=0` (store exactly the last batch's statistics) does not warn.
  """


# Frames of these packages are skipped when a warning points at the caller's line.
_LIBRARY_PACKAGES = frozenset({"jaxbn", "jax", "jaxlib", "flax", "equinox", "haiku"})


def _caller_stacklevel() -> int:
  """The `stacklevel` of the first frame outside jaxbn and the libraries calling it."""
  frame, level = sys._getframe(1), 1
  while frame is not None and (
      frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PACKAGES):
    frame, level = frame.f_back, level + 1
  return level


def canonicalize_axes(axis: int | Sequence[int], ndim: int, *,
                      name: str = "axis") -> tuple[int, ...]:
  """Returns `axis` as a sorted tuple of non-negative axes of a rank-`ndim` array.

  Raises:
    TypeError: an entry is not an integer.
    ValueError: an entry is out of range, repeated, or `axis` is empty.
  """
  axes = (axis,) if isinstance(axis, (numbers.Integral, np.integer)) else axis
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.") from None
  if not axes:
    raise ValueError(f"{name} must name at least one axis, got {axis!r}.")
  canonical = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
      raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={axis!r} is out of range for an input of rank {ndim}; "
          f"expected values in [{-ndim}, {ndim - 1}].")
    canonical.append(int(a) % ndim)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"{name}={axis!r} names the same axis more than once.")
  return tuple(sorted(canonical))


class ParsedInput(NamedTuple):
  """An input array and the split of its axes into features and reduced axes.

  Attributes:
    x: the input as a `jax.Array`.
    feature_axes: sorted non-negative feature axes.
    reduction_axes: every other axis, sorted.
    feature_shape: `x`'s sizes on `feature_axes`.
  """
  x: jax.Array
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]


def parse_input(x: jax.typing.ArrayLike, axis: int | Sequence[int], *,
                require_floating: bool = True) -> ParsedInput:
  """Converts `x` to an array and splits its axes at the feature `axis`.

  Args:
    x: the input.
    axis: feature axis or axes (int or sequence; negative allowed).
    require_floating: raise unless `x` has a floating-point dtype (the flax
      adapters check later, after their dtype promotion).

  Raises:
    TypeError: non-float `x` (with `require_floating`), non-integer axes.
    ValueError: axes out of range, repeated or empty.
  """
  x = jnp.asarray(x)
  if require_floating:
    check_floating(x)
  feature_axes = canonicalize_axes(axis, x.ndim)
  return ParsedInput(
      x=x, feature_axes=feature_axes,
      reduction_axes=tuple(a for a in range(x.ndim) if a not in feature_axes),
      feature_shape=tuple(x.shape[a] for a in feature_axes))


def feature_shape_of(num_features) -> tuple[int, ...]:
  """`num_features` (a positive int, or a tuple/list of them) as a shape tuple.

  Raises:
    ValueError: anything else, e.g. `"34"`, `2.7`, `True`, `0` or `()`.
  """
  shape = ((num_features,) if isinstance(num_features, (numbers.Integral, np.integer))
           else num_features)
  if (isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list))
      or not shape or any(isinstance(d, (bool, np.bool_))
                          or not isinstance(d, (numbers.Integral, np.integer))
                          or d <= 0 for d in shape)):
    raise ValueError(
        f"num_features must be a positive int or a tuple of them, got {num_features!r}.")
  return tuple(int(d) for d in shape)


def check_floating(x: jax.Array, name: str = "x") -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    hint = (f" Convert it first, e.g. {name}.astype(jnp.float32) (and scale images, "
            f"e.g. / 255)." if jnp.issubdtype(x.dtype, jnp.integer) else "")
    raise TypeError(
        f"{name} must have a floating-point dtype (float32, bfloat16, float16, "
        f"float64), got {x.dtype}.{hint}")


def check_epsilon(epsilon: float) -> float:
  if isinstance(epsilon, jax.core.Tracer) or not isinstance(
      epsilon, (numbers.Real, np.floating, np.integer)):
    raise TypeError(
        f"epsilon must be a Python float known at trace time, got {epsilon!r}.")
  if not epsilon > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon!r}.")
  return float(epsilon)


def check_momentum(momentum: float | None) -> float | None:
  if momentum is None:
    return None
  if isinstance(momentum, jax.core.Tracer) or not isinstance(
      momentum, (numbers.Real, np.floating, np.integer)):
    raise TypeError(
        "momentum must be a Python float in [0, 1) or None (cumulative "
        f"average), got {momentum!r}.")
  if not 0.0 <= momentum < 1.0:
    raise ValueError(
        f"momentum must be in [0, 1) (the weight of the old running value), "
        f"got {momentum!r}. PyTorch's momentum=0.1 is momentum=0.9 here.")
  if 0.0 < momentum < SUSPICIOUS_MOMENTUM:
    warnings.warn(momentum_warning_message(momentum), MomentumWarning,
                  stacklevel=_caller_stacklevel())
  return float(momentum)


def momentum_warning_message(momentum: float) -> str:
  return (
      f"momentum={momentum!r} keeps only {100 * momentum:.3g}% of the old running statistics "
      "at each step: jaxbn's momentum is the weight of the old value (flax, Keras). "
      f"PyTorch's momentum={momentum!r} is momentum={1 - momentum:.4g} here. If you "
      "mean it, silence this with "
      "warnings.filterwarnings('ignore', category=jaxbn.MomentumWarning).")


def check_training(training) -> bool:
  if isinstance(training, jax.core.Tracer):
    raise TypeError(
        "training must be a Python bool known at trace time, got a traced "
        "value; mark it static (e.g. jax.jit(..., static_argnames='training')).")
  if not isinstance(training, (bool, np.bool_)):
    raise TypeError(f"training must be a bool, got {training!r}.")
  return bool(training)


def check_feature_shape(tree, expected: tuple[int, ...], *, tree_name: str,
                        field_names: Sequence[str], x_shape: tuple[int, ...],
                        feature_axes: tuple[int, ...]) -> None:
  """Checks that each named field of a params/state NamedTuple has `expected` shape."""
  for field in field_names:
    value = getattr(tree, field, None)
    if value is None:
      raise ValueError(f"{tree_name}.{field} is missing; build it with jaxbn.init.")
    if tuple(np.shape(value)) != expected:
      raise ValueError(
          f"{tree_name}.{field} has shape {tuple(np.shape(value))}, but x of shape "
          f"{x_shape} with feature axes {feature_axes} needs shape {expected}."
          + _channels_first_hint(tuple(np.shape(value)), x_shape, feature_axes))


def _channels_first_hint(field_shape, x_shape, feature_axes) -> str:
  """A hint when `x` looks NCHW (features on axis 1) but the last axis was named."""
  channels_last = len(x_shape) >= 3 and feature_axes == (len(x_shape) - 1,)
  if channels_last and field_shape == (x_shape[1],):
    return (f" x looks channels-first (NCHW, {x_shape[1]} features on axis 1): "
            "pass axis=1.")
  return ""


def normalize_axis_name(axis_name) -> tuple | None:
  if axis_name is None:
    return None
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  if not names:
    raise ValueError("axis_name must be a name or a non-empty tuple of names.")
  return tuple(names)


def check_axis_names_bound(names: tuple | None) -> None:
  """Checks that each name of `normalize_axis_name`'s output is a mapped axis here.

  Raises:
    NameError: a name is not bound by an enclosing vmap / shard_map, with what
      to do under plain `jax.jit` (JAX's own error names only the axis).
  """
  for name in names or ():
    try:
      jax.lax.axis_size(name)
    except NameError:
      shown = names[0] if len(names) == 1 else names
      raise NameError(
          f"axis_name={shown!r}: {name!r} is not bound by an enclosing jax.vmap or "
          "jax.shard_map. Under plain jax.jit over batch-sharded arrays leave "
          "axis_name=None (the statistics are already global); under vmap or "
          f"shard_map, map over {name!r} (e.g. jax.vmap(f, axis_name={name!r})).") from None


def normalize_axis_index_groups(groups, axis_name) -> tuple[tuple[int, ...], ...] | None:
  """Checks that `groups` partition the replicas into equal-size groups."""
  if groups is None:
    return None
  if axis_name is None:
    raise ValueError("axis_index_groups needs axis_name to be set.")
  try:
    groups = tuple(tuple(int(i) for i in g) for g in groups)
  except TypeError:
    raise TypeError(
        "axis_index_groups must be a sequence of sequences of replica indices, "
        f"got {groups!r}.") from None
  if not groups or any(len(g) != len(groups[0]) for g in groups) or not groups[0]:
    raise ValueError(
        "axis_index_groups must be non-empty groups of equal size, got "
        f"{groups!r}.")
  flat = sorted(i for g in groups for i in g)
  if flat != list(range(len(flat))):
    raise ValueError(
        "axis_index_groups must contain every replica index 0..N-1 exactly once, "
        f"got {groups!r}.")
  return groups


def broadcast_mask(mask, x_shape: tuple[int, ...]) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}.")
  try:
    np.broadcast_shapes(mask.shape, x_shape)
  except ValueError:
    raise ValueError(
        f"mask of shape {mask.shape} is not broadcastable to x of shape {x_shape}."
    ) from None
  if np.broadcast_shapes(mask.shape, x_shape) != tuple(x_shape):
    raise ValueError(
        f"mask of shape {mask.shape} would broadcast x of shape {x_shape} to a "
        "larger shape; it must be broadcastable to x's shape.")
  return mask
