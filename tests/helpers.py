"""What the tests share. Trees are compared with chex (`chex.assert_trees_all_close`,
`chex.assert_trees_all_equal`); these helpers build the trees that are compared."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn


def normal(shape, seed: int = 0, loc: float = 0.0, scale: float = 1.0) -> jax.Array:
  """float32 array of `shape` drawn from N(loc, scale^2) by numpy's generator `seed`."""
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def random_params(feature_shape, seed: int = 0) -> jaxbn.BatchNormParams:
  """BN parameters away from the identity: scale uniform in [0.5, 2), bias N(0, 1)."""
  rng = np.random.default_rng(seed)
  return jaxbn.BatchNormParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, feature_shape), jnp.float32),
      bias=jnp.asarray(rng.normal(size=feature_shape), jnp.float32))


def outputs_and_grads(norm: Callable, params, x, cotangent):
  """`(y, new_state, (d params, d x))` of `norm(params, x) -> (y, new_state)`.

  The gradients are those of the loss `sum(y * cotangent)`, i.e. the VJP of
  `y` with `cotangent`, so two normalizations that agree here agree in their
  forward pass, their state update and their backward pass.
  """
  def loss(params, x):
    y, new_state = norm(params, x)
    return jnp.sum(y * cotangent), (y, new_state)
  (_, (y, new_state)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  return y, new_state, grads
