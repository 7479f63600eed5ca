"""PreciseBN and replica synchronization for flax's `{'mean', 'var'}` statistics.

`jaxbn.recompute_stats` and `jaxbn.sync_stats` work on `jaxbn.BatchNormState`
nodes. The flax adapters keep flax's variables instead (`batch_stats` with
`mean` and `var` per layer in linen, `nnx.BatchStat`s in nnx), so these are the
same two operations over those trees: `jaxbn.linen.recompute_stats`,
`jaxbn.linen.sync_stats`, `jaxbn.nnx.recompute_stats`, `jaxbn.nnx.sync_stats`.

A layer's statistics are found by their path: a `mean` and a `var` leaf with the
same parent (an nnx `Variable`'s trailing `.value` is looked through).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import functools
import itertools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _state
from jaxbn import _flax_adapter
from jaxbn import _stats
from jaxbn import _sync


def _key_name(key) -> Any:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return getattr(key, attribute)
  return key


def _layer_paths(tree) -> tuple[list, list[tuple[int, int]]]:
  """The leaves of `tree` and, per layer, the indices of its (mean, var) leaves."""
  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in with_paths]
  layers: dict[tuple, dict[str, int]] = {}
  for index, (path, _) in enumerate(with_paths):
    names = [_key_name(key) for key in path]
    if names and names[-1] == "value":  # an nnx Variable's array
      names = names[:-1]
    if names and names[-1] in ("mean", "var"):
      layers.setdefault(tuple(names[:-1]), {})[names[-1]] = index
  pairs = [(found["mean"], found["var"]) for found in layers.values()
           if set(found) == {"mean", "var"}]
  return leaves, pairs


def _replace_layers(tree, new_stats: list[tuple[jax.Array, jax.Array]]):
  leaves, pairs = _layer_paths(tree)
  leaves = list(leaves)
  for (mean_index, var_index), (mean, var) in zip(pairs, new_stats):
    leaves[mean_index], leaves[var_index] = mean, var
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _layer_stats(tree, tree_name: str) -> list[tuple[jax.Array, jax.Array]]:
  leaves, pairs = _layer_paths(tree)
  if not pairs:
    raise ValueError(
        f"{tree_name} holds no batch-norm statistics (a 'mean' and a 'var' under the "
        "same layer); pass the model's batch_stats (linen) or its nnx.BatchStat state.")
  return [(leaves[m], leaves[v]) for m, v in pairs]


def sync_stats(batch_stats, axis_name):
  """Replaces per-replica running statistics by their pooled values.

  `jaxbn.sync_stats` for flax's trees: every layer's `mean` and `var` become,
  on every replica, the mean of the means and the mean of the variances plus
  the variance of the means (the pooled variance of equally weighted
  replicas), in three collectives for all layers together. This is what
  averaging `batch_stats` with `lax.pmean` (the flax examples'
  `cross_replica_mean`) gets wrong: it drops the variance of the means.

  Call it inside `jax.shard_map` or `jax.vmap(..., axis_name=...)`.

  Args:
    batch_stats: linen's `variables['batch_stats']`, an `nnx.State` of
      `nnx.BatchStat`s, or any pytree with `mean`/`var` leaves per layer.
    axis_name: mapped axis name or tuple of names to pool over.

  Returns:
    `batch_stats` with pooled statistics, replicated over `axis_name`.

  Raises:
    ValueError: `axis_name` is None, or the tree holds no statistics.
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.
  """
  stats = _layer_stats(batch_stats, "batch_stats")
  states = [_state.BatchNormState(mean=mean, var=var, count=jnp.zeros((), jnp.int32))
            for mean, var in stats]
  synced = _sync.sync_stats(states, axis_name)
  return _replace_layers(batch_stats, [(s.mean, s.var) for s in synced])


def _check_num_batches(num_batches) -> None:
  if num_batches is not None and (
      isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral)
      or num_batches < 1):
    raise TypeError(f"num_batches must be a positive int or None, got {num_batches!r}.")


def _pool(batch_stats_per_batch: Iterable, original, num_batches: int | None,
          tree_name: str):
  """Equal-weight pooling of each layer's batch statistics over batches.

  Features whose pooled statistics are not finite keep their old values.
  """
  originals = _layer_stats(original, tree_name)
  pooled, used = None, 0
  for batch_stats in itertools.islice(batch_stats_per_batch, num_batches):
    moments = [_stats.Moments(jnp.ones((), jnp.float32), mean.astype(jnp.float32),
                              var.astype(jnp.float32))
               for mean, var in _layer_stats(batch_stats, tree_name)]
    pooled = moments if pooled is None else [
        _stats.merge_moments(a, b) for a, b in zip(pooled, moments)]
    used += 1
  if used == 0 or (num_batches is not None and used < num_batches):
    raise ValueError(f"recompute_stats needs {num_batches or 'at least one'} batches, "
                     f"got {used}.")
  new_stats = []
  for total, (old_mean, old_var) in zip(pooled, originals):
    keep = jnp.isfinite(total.mean) & jnp.isfinite(total.var)
    new_stats.append((jnp.where(keep, total.mean, old_mean).astype(old_mean.dtype),
                      jnp.where(keep, total.var, old_var).astype(old_var.dtype)))
  return _replace_layers(original, new_stats)


@functools.partial(jax.jit, static_argnames=("module", "apply_kwargs"))
def _linen_batch_statistics(module, variables, batch, apply_kwargs):
  with _flax_adapter.recording_batch_statistics():
    _, updates = module.apply(variables, batch, mutable=["batch_stats"],
                              **dict(apply_kwargs))
  return updates["batch_stats"]


def linen_recompute_stats(module, variables, batches: Iterable, *,
                          num_batches: int | None = None, **apply_kwargs):
  """PreciseBN for a linen model built with `jaxbn.linen.BatchNorm`.

  Runs `module.apply(variables, batch, mutable=['batch_stats'], **apply_kwargs)`
  for each batch with the BN layers storing their batch statistics (momentum
  0 for this pass only), and replaces each layer's `mean` and `var` by those
  pooled with equal weight per batch, as `jaxbn.recompute_stats`: the mean of
  the batch means, and the mean of the batch variances plus the variance of
  the batch means. Parameters are fixed; each layer sees its input as in
  training.

  Args:
    module: the linen model (hashable, as linen modules are); its forward pass
      is jitted with the module static.
    variables: `{'params': ..., 'batch_stats': ...}` (other collections are
      passed through).
    batches: iterable of model inputs, each passed as the one positional
      argument (they may be `jax.Array`s sharded over devices: the statistics
      are then global).
    num_batches: use the first `num_batches` batches; None uses all.
    **apply_kwargs: keyword arguments that put the model in training mode,
      e.g. `train=True` (hashable values).

  Returns:
    `variables` with new `batch_stats`; a feature whose pooled statistics are
    not finite keeps its old values.

  Raises:
    ValueError: no `batch_stats`, or fewer batches than `num_batches`.
    TypeError: `num_batches` is not a positive int.
  """
  _check_num_batches(num_batches)
  if "batch_stats" not in variables:
    raise ValueError("variables has no 'batch_stats' collection to recompute.")
  frozen_kwargs = tuple(sorted(apply_kwargs.items()))
  per_batch = (_linen_batch_statistics(module, variables, batch, frozen_kwargs)
               for batch in batches)
  new_stats = _pool(per_batch, variables["batch_stats"], num_batches,
                    "variables['batch_stats']")
  return {**variables, "batch_stats": new_stats}


def nnx_recompute_stats(model, batches: Iterable, *,
                        forward: Callable[[Any, Any], Any] | None = None,
                        num_batches: int | None = None) -> None:
  """PreciseBN for an nnx model built with `jaxbn.nnx.BatchNorm`, in place.

  Runs `forward(model, batch)` (default `model(batch)`) for each batch, jitted,
  with every BN layer in training mode and storing its batch statistics
  (momentum 0 for this pass only), then sets each layer's `mean` and `var` to
  those pooled with equal weight per batch (see
  `jaxbn.linen.recompute_stats`). Parameters and the model's train/eval mode
  are unchanged afterwards.

  Args:
    model: an `nnx.Module`.
    batches: iterable of batches passed to `forward`.
    forward: `(model, batch) -> anything`, the training forward pass; must be
      hashable (a function).
    num_batches: use the first `num_batches` batches; None uses all.

  Raises:
    ValueError: the model holds no batch statistics, or fewer batches than
      `num_batches`.
    TypeError: `num_batches` is not a positive int.
  """
  from flax import nnx

  _check_num_batches(num_batches)
  forward = forward or _call_model
  graphdef, stats, rest = nnx.split(model, nnx.BatchStat, ...)
  per_batch = (_nnx_batch_statistics(graphdef, forward, stats, rest, batch)
               for batch in batches)
  nnx.update(model, _pool(per_batch, stats, num_batches, "the model's nnx.BatchStat state"))


def _call_model(model, batch):
  return model(batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_batch_statistics(graphdef, forward, stats, rest, batch):
  from flax import nnx

  model = nnx.merge(graphdef, stats, rest)
  with _flax_adapter.recording_batch_statistics():
    forward(model, batch)
  return nnx.state(model, nnx.BatchStat)
