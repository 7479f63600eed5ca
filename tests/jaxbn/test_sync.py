"""jaxbn.sync_stats: pooling per-replica running statistics, against NumPy."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import jaxbn
from training import hlo


def _per_replica_states(num_replicas=8, seed=0, loc=0.0):
  """Stacked per-replica states (leading replica axis) of a two-layer model."""
  rng = np.random.default_rng(seed)

  def layer(features, count):
    return jaxbn.BatchNormState(
        mean=jnp.asarray(rng.normal(loc, 1.0, (num_replicas,) + features), jnp.float32),
        var=jnp.asarray(rng.uniform(0.5, 2.0, (num_replicas,) + features), jnp.float32),
        count=jnp.full((num_replicas,), count, jnp.int32).at[-1].add(-1))

  return {"conv": layer((2, 3), 40), "head": [layer((5,), 41), jnp.arange(num_replicas)]}


def _pooled(stacked):
  mean = np.asarray(stacked.mean, np.float64)
  var = np.asarray(stacked.var, np.float64)
  return mean.mean(0), var.mean(0) + mean.var(0), int(np.max(stacked.count))


def _assert_synced(synced, stacked, replicated=True):
  for got, per_replica in ((synced["conv"], stacked["conv"]),
                           (synced["head"][0], stacked["head"][0])):
    mean, var, count = _pooled(per_replica)
    if not replicated:  # one copy per replica: all equal to the pooled value
      got = jax.tree.map(lambda a: a[0], got)
    np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, var, rtol=1e-5)
    assert got.count == count and got.count.dtype == jnp.int32


def test_shard_map_pools_every_layer_of_the_state_tree(mesh8):
  stacked = _per_replica_states()

  def sync(state):
    local = jax.tree.map(lambda a: a[0], state)    # this replica's own state
    synced = jaxbn.sync_stats(local, "data")
    synced["head"][1] = synced["head"][1][None]    # per-replica: restack it
    return synced

  specs = jax.tree.map(lambda _: P("data"), stacked)
  out_specs = {"conv": P(), "head": [P(), P("data")]}
  step = jax.jit(jax.shard_map(sync, mesh=mesh8, in_specs=(specs,),
                               out_specs=out_specs))
  sharded = jax.device_put(stacked, NamedSharding(mesh8, P("data")))
  synced = step(sharded)
  _assert_synced(synced, stacked)
  # Non-BN leaves are untouched (here: each replica's own value).
  np.testing.assert_array_equal(synced["head"][1], np.arange(8))
  # Three collectives for the whole tree, however many layers it holds.
  assert hlo.count_collectives(step.lower(sharded).compile().as_text()).total == 3


def test_vmap_over_stacked_states():
  stacked = _per_replica_states(num_replicas=4)
  synced = jax.jit(jax.vmap(lambda s: jaxbn.sync_stats(s, "replica"),
                            axis_name="replica"))(stacked)
  _assert_synced(synced, stacked, replicated=False)


def test_large_close_means_keep_their_variance():
  """Means near 3000 spread by 0.01: a one-psum E[m^2] - E[m]^2 would lose it."""
  rng = np.random.default_rng(1)
  means = 3000.0 + 0.01 * rng.normal(size=(8, 4))
  state = jaxbn.BatchNormState(mean=jnp.asarray(means, jnp.float32),
                               var=jnp.full((8, 4), 1e-4, jnp.float32),
                               count=jnp.zeros((8,), jnp.int32))
  synced = jax.vmap(lambda s: jaxbn.sync_stats(s, "r"), axis_name="r")(state)
  means32 = np.asarray(state.mean, np.float64)   # the values actually stored
  np.testing.assert_allclose(synced.var[0], 1e-4 + means32.var(0), rtol=1e-3)
  np.testing.assert_allclose(synced.mean[0], means32.mean(0), rtol=1e-7)


def test_per_device_training_then_sync_equals_global_batch_statistics(mesh8):
  """Per-device BN from a fresh state with momentum 0 stores each device's batch
  statistics; with equal per-device batches, syncing gives the global batch's."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 4, 3)) + rng.normal(size=(8, 1, 3)), jnp.float32)
  _, state = jaxbn.init(3)

  def step(x):
    _, local = jaxbn.batch_norm(None, state, x[0], training=True, momentum=0.0)
    return jaxbn.sync_stats(local, "data")

  synced = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=P("data"), out_specs=P()))(
      jax.device_put(x, NamedSharding(mesh8, P("data"))))
  flat = np.asarray(x, np.float64).reshape(-1, 3)
  np.testing.assert_allclose(synced.mean, flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(synced.var, flat.var(0), rtol=1e-5)
  assert synced.count == 1


def test_tuple_axis_name_pools_over_both_axes():
  stacked = _per_replica_states(num_replicas=6)
  grid = jax.tree.map(lambda a: a.reshape((2, 3) + a.shape[1:]), stacked)
  sync = jax.vmap(jax.vmap(lambda s: jaxbn.sync_stats(s, ("outer", "inner")),
                           axis_name="inner"), axis_name="outer")
  synced = jax.tree.map(lambda a: a.reshape((6,) + a.shape[2:]), sync(grid))
  _assert_synced(synced, stacked, replicated=False)


def test_bad_usage_raises():
  _, state = jaxbn.init(3)
  with pytest.raises(ValueError, match=r"sync_stats needs axis_name"):
    jaxbn.sync_stats(state, None)
  with pytest.raises(ValueError, match=r"state holds no jaxbn.BatchNormState"):
    jax.vmap(lambda s: jaxbn.sync_stats(s, "r"), axis_name="r")({"w": jnp.ones((2, 3))})
  with pytest.raises(NameError):
    jaxbn.sync_stats(state, "unbound")
