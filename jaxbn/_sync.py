"""Merging per-replica running statistics into pooled ones."""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxbn import _state
from jaxbn import _stats
from jaxbn import _validation


def sync_stats(state, axis_name):
  """Replaces per-replica running statistics by their pooled values.

  For models trained with per-device batch norm (no `axis_name`), whose
  replicas each hold running statistics of their own data. Every
  `BatchNormState` in the `state` pytree becomes, on every replica,

    mean = mean over replicas of the means
    var  = mean over replicas of the variances + variance of the means

  the law of total variance with each replica weighing the same (running
  averages carry no example counts to weight by; replicas that ran the same
  number of steps on equal per-device batches weigh the same anyway), and
  `count` = the largest count of any replica.

  All layers travel together in three small collectives however many there
  are: a psum of the means, a psum of the variances plus squared deviations
  from the pooled mean, and a pmax of the counts. The deviations are taken
  from the pooled mean (two passes) rather than as E[mean^2] - E[mean]^2 in
  one psum, which in float32 would lose the variance of the means to
  cancellation whenever the means are large and close to each other.

  Call it inside `jax.shard_map` or `jax.vmap(..., axis_name=...)`. For
  per-device states stacked on a leading axis outside any mapped context,
  `jax.vmap(lambda s: jaxbn.sync_stats(s, "replica"), axis_name="replica")`.

  Args:
    state: a pytree holding `jaxbn.BatchNormState` nodes (anything else is
      returned unchanged), each replica's own values.
    axis_name: mapped axis name or tuple of names to pool over.

  Returns:
    `state` with pooled `BatchNormState`s, identical (replicated) on every
    replica, so `shard_map` can return them with `out_specs=P()`.

  Raises:
    ValueError: `axis_name` is None, or `state` holds no `BatchNormState`.
    NameError: `axis_name` is not bound by an enclosing vmap / shard_map.
  """
  names = _validation.normalize_axis_name(axis_name)
  if names is None:
    raise ValueError(
        "sync_stats needs axis_name, the mapped axis (vmap / shard_map) whose "
        "replicas hold the statistics to pool.")
  states = _state.states_in(state)
  if not states:
    raise ValueError("state holds no jaxbn.BatchNormState to synchronize.")
  num_replicas = _stats.replica_count(names, None)
  sizes = [int(np.size(s.mean)) for s in states]
  means = jnp.concatenate([jnp.ravel(s.mean).astype(jnp.float32) for s in states])
  variances = jnp.concatenate([jnp.ravel(s.var).astype(jnp.float32) for s in states])
  pooled_mean = _stats.cross_replica_sum(means, names) / num_replicas
  deviation = means - pooled_mean
  pooled_var = _stats.cross_replica_sum(variances + deviation * deviation,
                                        names) / num_replicas
  counts = lax.pmax(jnp.stack([jnp.asarray(s.count) for s in states]), names)
  offsets = np.cumsum([0] + sizes)
  synced = []
  for i, s in enumerate(states):
    layer = slice(offsets[i], offsets[i + 1])
    synced.append(s._replace(
        mean=pooled_mean[layer].reshape(jnp.shape(s.mean)).astype(s.mean.dtype),
        var=pooled_var[layer].reshape(jnp.shape(s.var)).astype(s.var.dtype),
        count=counts[i].astype(jnp.asarray(s.count).dtype)))
  return _state.replace_states(state, synced)
