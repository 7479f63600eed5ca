"""Cross-replica batch norm on 8 CPU devices equals single-device BN on the global batch."""

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import jaxbn
from tests import helpers
from training import hlo

def _data(shape=(16, 4, 4, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = jaxbn.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2, shape[-1]), jnp.float32),
                                 jnp.asarray(rng.normal(size=shape[-1]), jnp.float32))
  _, state = jaxbn.init(shape[-1])
  return params, state, x, cotangent


def _loss(params, state, x, cotangent, **kwargs):
  y, new_state = jaxbn.batch_norm(params, state, x, training=True, **kwargs)
  return jnp.sum(y * cotangent), (y, new_state)


def _single_device(params, state, x, cotangent, **kwargs):
  """`(y, new_state, (d params, d x))` of batch_norm over the whole batch."""
  return helpers.outputs_and_grads(
      lambda p, x: jaxbn.batch_norm(p, state, x, training=True, **kwargs),
      params, x, cotangent)


# Distributed vs single-device results: the same float32 sums in another order.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_with_axis_name_equals_global_batch(mesh8, check_vma):
  params, state, x, cotangent = _data()
  want = _single_device(params, state, x, cotangent)

  def per_device(params, state, x, cotangent):
    (_, (y, new_state)), grads = jax.value_and_grad(_loss, (0, 2), has_aux=True)(
        params, state, x, cotangent, axis_name="data")
    if not check_vma:  # replicated params: sum per-device gradient contributions
      grads = (lax.psum(grads[0], "data"), grads[1])
    return y, new_state, grads

  step = jax.jit(jax.shard_map(
      per_device, mesh=mesh8, in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P("data"), P(), (P(), P("data"))), check_vma=check_vma))
  sharded = NamedSharding(mesh8, P("data"))
  got = step(params, state, jax.device_put(x, sharded), jax.device_put(cotangent, sharded))
  chex.assert_trees_all_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_jit_over_batch_sharded_arrays_equals_global_batch(axis_type):
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  params, state, x, cotangent = _data()
  want = _single_device(params, state, x, cotangent)
  sharded = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    got = jax.jit(_single_device)(params, state, jax.device_put(x, sharded),
                                  jax.device_put(cotangent, sharded))
  chex.assert_trees_all_close(got, want, **TOLERANCE)
  assert got[0].sharding.spec[0] == "data"


def test_vmap_with_axis_name_equals_batch_statistics():
  params, state, x, cotangent = _data(shape=(12, 5))
  want = _single_device(params, state, x, cotangent)
  per_example = jax.vmap(
      lambda p, s, xi: jaxbn.batch_norm(p, s, xi, training=True, axis_name="batch"),
      in_axes=(None, None, 0), out_axes=(0, None), axis_name="batch")
  y, new_state = per_example(params, state, x)
  grads = jax.grad(lambda p, x: jnp.sum(per_example(p, state, x)[0] * cotangent),
                   (0, 1))(params, x)
  chex.assert_trees_all_close((y, new_state, grads), want, **TOLERANCE)


def test_nested_vmap_with_tuple_axis_name():
  """equinox#707: nested vmaps pool over a tuple of axis names."""
  params, state, x, _ = _data(shape=(12, 5))
  inner = lambda xi: jaxbn.batch_norm(params, state, xi, training=True,
                                      axis_name=("outer", "inner"))
  nested = jax.vmap(jax.vmap(inner, out_axes=(0, None), axis_name="inner"),
                    out_axes=(0, None), axis_name="outer")
  y, new_state = nested(x.reshape(3, 4, 5))
  want = jaxbn.batch_norm(params, state, x, training=True)
  chex.assert_trees_all_close((y.reshape(12, 5), new_state), want, **TOLERANCE)


def test_masked_uneven_replicas_are_count_weighted(mesh8):
  """flax#2417: A has 8 valid zeros, B one valid 10 -> pooled mean 10/9, not 5."""
  x = jnp.zeros((8, 8, 1)).at[1, 0, 0].set(10.0)            # (replica, example, feature)
  mask = jnp.zeros((8, 8, 1), bool).at[0].set(True).at[1, 0].set(True)
  _, state = jaxbn.init(1)
  step = jax.jit(jax.shard_map(
      lambda x, m: jaxbn.batch_norm(None, state, x[0], training=True, mask=m[0],
                                    axis_name="data", momentum=0.0),
      mesh=mesh8, in_specs=(P("data"), P("data")), out_specs=(P("data"), P())))
  sharded = NamedSharding(mesh8, P("data"))
  y, new_state = step(jax.device_put(x, sharded), jax.device_put(mask, sharded))
  np.testing.assert_allclose(new_state.mean, [10 / 9], rtol=1e-6)
  pooled = np.array([0.0] * 8 + [10.0])
  np.testing.assert_allclose(new_state.var, [pooled.var()], rtol=1e-5)
  single, _ = jaxbn.batch_norm(None, state, x.reshape(64, 1), training=True,
                               mask=mask.reshape(64, 1))
  np.testing.assert_allclose(y, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("check_vma", [True, False])
def test_axis_index_groups_pool_within_each_group(mesh8, check_vma):
  params, state, x, cotangent = _data(shape=(16, 3))
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]

  def per_device(params, x, cotangent):
    (_, (y, new_state)), grads = jax.value_and_grad(_loss, (0, 2), has_aux=True)(
        params, state, x, cotangent, axis_name="data", axis_index_groups=groups)
    return y, new_state.mean[None], grads[1]

  step = jax.jit(jax.shard_map(
      per_device, mesh=mesh8, in_specs=(P(), P("data"), P("data")),
      out_specs=(P("data"), P("data"), P("data")), check_vma=check_vma))
  sharded = NamedSharding(mesh8, P("data"))
  y, means, dx = jax.device_get(
      step(params, jax.device_put(x, sharded), jax.device_put(cotangent, sharded)))
  for g, rows in enumerate([slice(0, 8), slice(8, 16)]):
    want_y, want_state, (_, want_dx) = _single_device(params, state, x[rows], cotangent[rows])
    chex.assert_trees_all_close((y[rows], dx[rows]), (want_y, want_dx), **TOLERANCE)
    for replica in groups[g]:
      chex.assert_trees_all_close(means[replica], want_state.mean, **TOLERANCE)


def test_axis_index_groups_under_vmap():
  params, state, x, _ = _data(shape=(8, 3))
  y, _ = jax.vmap(lambda xi: jaxbn.batch_norm(
      params, state, xi, training=True, axis_name="b",
      axis_index_groups=[[0, 2, 4, 6], [1, 3, 5, 7]]), out_axes=(0, 0), axis_name="b")(x)
  want_even, _ = jaxbn.batch_norm(params, state, x[0::2], training=True)
  chex.assert_trees_all_close(y[0::2], want_even, **TOLERANCE)


def test_first_step_and_warm_state_accuracy_under_shard_map(mesh8):
  """One psum of sums shifted by the debiased running mean stays exact once warm."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(3000.0, 1.0, (64, 4)), jnp.float32)
  params, state = jaxbn.init(4)
  step = jax.jit(jax.shard_map(
      lambda s, x: jaxbn.batch_norm(params, s, x, training=True, axis_name="data"),
      mesh=mesh8, in_specs=(P(), P("data")), out_specs=(P("data"), P())))
  xs = jax.device_put(x, NamedSharding(mesh8, P("data")))
  _, warm = step(state, xs)                     # first step: shift 0 (documented)
  y, _ = step(warm, xs + 3.0)                   # later steps: exact
  np.testing.assert_allclose(np.std(np.asarray(y, np.float64), 0), 1.0, atol=1e-3)


@pytest.mark.parametrize("use_mask", [False, True])
def test_one_collective_forward_two_forward_backward(mesh8, use_mask):
  params, state, x, cotangent = _data()
  # A per-device mask (closed over inside shard_map): the count joins the same psum.
  mask = jnp.array([True, False]).reshape(2, 1, 1, 1) if use_mask else None
  kwargs = dict(axis_name="data", mask=mask)

  def forward(params, x):
    return jaxbn.batch_norm(params, state, x, training=True, **kwargs)

  def forward_backward(params, x, cotangent):
    return jax.grad(lambda p, x: lax.psum(_loss(p, state, x, cotangent, **kwargs)[0], "data"),
                    (0, 1))(params, x)

  sharded = NamedSharding(mesh8, P("data"))
  xs, cs = jax.device_put(x, sharded), jax.device_put(cotangent, sharded)
  fwd = jax.jit(jax.shard_map(forward, mesh=mesh8, in_specs=(P(), P("data")),
                              out_specs=(P("data"), P())))
  fwd_bwd = jax.jit(jax.shard_map(forward_backward, mesh=mesh8,
                                  in_specs=(P(), P("data"), P("data")),
                                  out_specs=(P(), P("data"))))
  assert hlo.count_collectives(fwd.lower(params, xs).compile().as_text()).total == 1
  assert hlo.count_collectives(fwd_bwd.lower(params, xs, cs).compile().as_text()).total == 2


def test_unbound_axis_name_raises_name_error():
  params, state, x, _ = _data(shape=(8, 3))
  with pytest.raises(NameError):
    jaxbn.batch_norm(params, state, x, training=True, axis_name="nope")
