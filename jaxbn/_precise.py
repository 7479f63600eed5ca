"""Precise batch-norm statistics (PreciseBN; Wu & Johnson, 2021).

Running averages mix statistics from many past versions of the weights, with
most weight on the last few batches. PreciseBN replaces them, for fixed
weights, by population statistics computed over many batches with equal
weight. Here every jaxbn state in a model's state pytree is swapped for a
probe state that makes the layer return its batch statistics (see
`_state.BatchStatisticsProbe`), so any model built from jaxbn functions
works unchanged, jitted or not, sharded or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools
import itertools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _state
from jaxbn import _stats


def _state_paths(state) -> list[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_state.is_state)
  return ["state" + jax.tree_util.keystr(path) for path, leaf in leaves
          if _state.is_state(leaf)]


@functools.partial(jax.jit, static_argnums=0)
def _accumulate(apply_fn, params, probes, batch, pooled):
  """Runs one batch and folds each layer's batch statistics into `pooled`."""
  _, new_state = apply_fn(params, probes, batch)
  expected = jax.tree.structure(probes, is_leaf=_state.is_state)
  if jax.tree.structure(new_state, is_leaf=_state.is_state) != expected:
    raise ValueError(
        "apply_fn must return (output, new_state) with new_state structured like "
        f"the state it was given; expected {expected}, got "
        f"{jax.tree.structure(new_state, is_leaf=_state.is_state)}.")
  old_leaves = _state.states_in(probes)
  new_leaves = _state.states_in(new_state)
  paths = _state_paths(probes)
  updates = []
  for path, old, new in zip(paths, old_leaves, new_leaves):
    if not isinstance(new, _state.BatchStatisticsProbe):
      raise ValueError(
          f"The BatchNormState apply_fn returned at {path} is not the one jaxbn "
          "returned to it: pass each layer's new state from jaxbn "
          "(batch_norm, batch_renorm, ghost_batch_norm) through unchanged, or "
          "rebuild it with state._replace(...), not BatchNormState(...).")
    updates.append(new.count - old.count)
  # Each batch weighs the same: a batch is one "element" whose mean and
  # variance merge exactly (law of total variance) with those seen so far. A
  # feature the batch has no valid element of (probe var -1) is left out.
  pooled = [_stats.merge_moments(total, _batch_moments(new))
            for total, new in zip(pooled, new_leaves)]
  return pooled, jnp.stack(updates)


def _batch_moments(probe) -> _stats.Moments:
  """One batch's statistics from a probe, as a count-1 (or empty: 0) element."""
  mean = probe.mean.astype(jnp.float32)
  var = probe.var.astype(jnp.float32)
  present = ~(var < 0)  # NaN stays present, and poisons the result as it should
  return _stats.Moments(count=present.astype(jnp.float32),
                        mean=jnp.where(present, mean, 0.0),
                        var=jnp.where(present, var, 0.0))


def recompute_stats(apply_fn: Callable[[Any, Any, Any], tuple[Any, Any]],
                    params, state, batches: Iterable, *,
                    num_batches: int | None = None):
  """Recomputes every batch-norm layer's running statistics over `batches`.

  Each batch runs through `apply_fn(params, s, batch)`, the model's
  training-mode forward pass, from the original `state`: each layer's input
  is computed as in training, normalized by earlier layers with their batch
  statistics, exactly as in the paper. Each layer's mean and variance over a
  batch (what `momentum=0` would store, so with `unbiased_running_var=True`
  the `n / (n - 1)` correction is included) are then pooled with equal weight
  per batch:

    mean = mean over batches of the batch means
    var  = mean over batches of the batch variances
           + variance over batches of the batch means

  For batches of equal size without masks that is exactly the mean and
  (biased) variance of the layer's input over all examples of all batches.
  With unequal batch sizes or masks each batch still weighs the same (as in
  PreciseBN), so prefer equal batches (drop a ragged last batch).

  `apply_fn` must call jaxbn's training-mode functions (`batch_norm`,
  `batch_renorm`, `ghost_batch_norm`) on the `BatchNormState`s it finds in the
  state it receives, once each, and return their new states in the same
  pytree structure. It is jitted here (with `apply_fn` static), so it may
  itself use `jax.jit`, `jax.shard_map` or `axis_name`, and batches may be
  `jax.Array`s sharded over devices: statistics are then global, as in
  training. Nothing else in the state changes, `count` included.

  Args:
    apply_fn: `(params, state, batch) -> (output, new_state)`, the training
      forward pass (dropout and other randomness as you wish; it is not
      differentiated). Must be hashable (functions and partials are).
    params: the model's parameters, passed to `apply_fn` unchanged.
    state: a pytree holding `jaxbn.BatchNormState` nodes (and anything else).
    batches: an iterable of batches, each passed to `apply_fn` as is.
    num_batches: use only the first `num_batches` batches (required for an
      endless iterator); None uses all of them.

  Returns:
    `state` with every `BatchNormState`'s `mean` and `var` replaced by the
    pooled statistics. A feature whose pooled statistics are not finite, or
    that has no valid (masked-in) element in any batch, keeps its old values;
    batches without a valid element of a feature do not count for it.

  Raises:
    ValueError: `state` holds no `BatchNormState`; fewer batches than
      `num_batches` (or none); `apply_fn` changes the state's structure,
      rebuilds a state, or does not run a layer exactly once in training mode.
    TypeError: `num_batches` is not a positive int.
  """
  if num_batches is not None and (
      isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral)
      or num_batches < 1):
    raise TypeError(f"num_batches must be a positive int or None, got {num_batches!r}.")
  paths = _state_paths(state)
  if not paths:
    raise ValueError(
        "state holds no jaxbn.BatchNormState; recompute_stats recomputes the "
        "statistics of jaxbn layers only.")
  originals = _state.states_in(state)
  probes = _state.replace_states(
      state, [_state.BatchStatisticsProbe(*s) for s in originals])
  pooled = [_stats.Moments(count=jnp.zeros(jnp.shape(s.mean), jnp.float32),
                           mean=jnp.zeros(jnp.shape(s.mean), jnp.float32),
                           var=jnp.zeros(jnp.shape(s.var), jnp.float32))
            for s in originals]
  updates = []
  for batch in itertools.islice(batches, num_batches):
    pooled, batch_updates = _accumulate(apply_fn, params, probes, batch, pooled)
    updates.append(batch_updates)
  if not updates or (num_batches is not None and len(updates) < num_batches):
    raise ValueError(
        f"recompute_stats needs {num_batches or 'at least one'} batches, got "
        f"{len(updates)}.")
  runs = np.asarray(jnp.stack(updates))
  for path, layer_runs in zip(paths, runs.T):
    if np.any(layer_runs != 1):
      raise ValueError(
          f"The batch-norm layer of {path} ran {sorted(set(layer_runs.tolist()))} "
          "times in training mode per batch; recompute_stats needs apply_fn to run "
          "every layer of the state exactly once with training=True.")
  recomputed = []
  for original, total in zip(originals, pooled):
    keep = (total.count > 0) & jnp.isfinite(total.mean) & jnp.isfinite(total.var)
    recomputed.append(original._replace(
        mean=jnp.where(keep, total.mean, original.mean).astype(original.mean.dtype),
        var=jnp.where(keep, total.var, original.var).astype(original.var.dtype)))
  return _state.replace_states(state, recomputed)
