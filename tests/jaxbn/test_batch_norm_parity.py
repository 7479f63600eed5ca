"""jaxbn gives the same numbers as flax (accurate variance) and PyTorch where they are right."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn


@pytest.mark.parametrize("shape,axis", [((8, 5, 5, 4), -1), ((6, 3, 4, 5), (1, 3))])
def test_matches_flax_linen_without_fast_variance(shape, axis):
  rng = np.random.default_rng(0)
  model = nn.BatchNorm(axis=axis, momentum=0.9, epsilon=1e-4,
                       use_fast_variance=False)
  variables = model.init(jax.random.key(0), jnp.zeros(shape), use_running_average=False)
  params = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2, v.shape), jnp.float32),
                        variables["params"])
  batch_stats = variables["batch_stats"]
  feature_shape = params["scale"].shape
  jaxbn_params = jaxbn.BatchNormParams(params["scale"], params["bias"])
  state = jaxbn.BatchNormState(batch_stats["mean"], batch_stats["var"],
                               jnp.zeros((), jnp.int32))
  for step in range(3):
    x = jnp.asarray(rng.normal(step, 2.0, shape), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def flax_loss(p, x, batch_stats=batch_stats):
      y, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                               use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(y * cotangent), (y, updates["batch_stats"])

    def jaxbn_loss(p, x, state=state):
      y, new_state = jaxbn.batch_norm(p, state, x, training=True, axis=axis, momentum=0.9,
                                      epsilon=1e-4)
      return jnp.sum(y * cotangent), (y, new_state)

    (_, (y_flax, batch_stats)), g_flax = jax.value_and_grad(
        flax_loss, (0, 1), has_aux=True)(params, x)
    (_, (y_jaxbn, state)), g_jaxbn = jax.value_and_grad(
        jaxbn_loss, (0, 1), has_aux=True)(jaxbn_params, x)
    np.testing.assert_allclose(y_jaxbn, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, batch_stats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, batch_stats["var"], rtol=1e-5)
    np.testing.assert_allclose(g_jaxbn[0].scale, g_flax[0]["scale"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_jaxbn[0].bias, g_flax[0]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_jaxbn[1], g_flax[1], rtol=1e-4, atol=1e-5)
    assert state.mean.shape == feature_shape
  eval_flax = model.apply({"params": params, "batch_stats": batch_stats}, x,
                          use_running_average=True)
  eval_jaxbn, _ = jaxbn.batch_norm(jaxbn_params, state, x, training=False, axis=axis,
                                   epsilon=1e-4)
  np.testing.assert_allclose(eval_jaxbn, eval_flax, rtol=1e-5, atol=1e-5)


def test_matches_torch_batchnorm2d_with_unbiased_running_var():
  """PyTorch momentum=0.1 (weight of the new value) is momentum=0.9 here."""
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm2d(4, momentum=0.1, eps=1e-5)
  with torch.no_grad():
    bn.weight.uniform_(0.5, 2.0)
    bn.bias.normal_()
  params = jaxbn.BatchNormParams(jnp.asarray(bn.weight.detach().numpy()),
                                 jnp.asarray(bn.bias.detach().numpy()))
  _, state = jaxbn.init(4)
  rng = np.random.default_rng(0)
  for step in range(3):
    x = rng.normal(step, 3.0, (6, 4, 5, 5)).astype(np.float32)  # NCHW
    x_torch = torch.tensor(x, requires_grad=True)
    y_torch = bn.train()(x_torch)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    (y_torch * torch.tensor(cotangent)).sum().backward()
    (y, state), vjp = jax.vjp(
        lambda p, x: jaxbn.batch_norm(p, state, x, training=True, axis=1, momentum=0.9,
                                      unbiased_running_var=True), params, jnp.asarray(x))
    dparams, dx = vjp((jnp.asarray(cotangent), jax.tree.map(jnp.zeros_like, state)))
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, x_torch.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams.scale, bn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams.bias, bn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    bn.weight.grad = bn.bias.grad = None
    np.testing.assert_allclose(state.mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, bn.running_var.numpy(), rtol=1e-5)
  assert int(state.count) == int(bn.num_batches_tracked)
  with torch.no_grad():
    eval_torch = bn.eval()(torch.tensor(x)).numpy()
  eval_jaxbn, _ = jaxbn.batch_norm(params, state, jnp.asarray(x), training=False, axis=1)
  np.testing.assert_allclose(eval_jaxbn, eval_torch, rtol=1e-5, atol=1e-5)
