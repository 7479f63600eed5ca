"""Tests of jaxbn.fold_into_conv / fold_into_dense against conv/dense + eval-mode BN."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

EPSILON = 1e-3


def _normal(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _trained_bn(rng, num_features, *, affine=True):
  """BN params and state with non-trivial values (as after training)."""
  params = jaxbn.BatchNormParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, num_features), jnp.float32),
      bias=_normal(rng, (num_features,)))
  state = jaxbn.BatchNormState(
      mean=_normal(rng, (num_features,)) * 3,
      var=jnp.asarray(rng.uniform(0.05, 4.0, num_features), jnp.float32),
      count=jnp.asarray(100, jnp.int32))
  return (params if affine else None), state


def _assert_close_relative(actual, expected, rtol=1e-5):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  # Relative to the output's scale: elementwise relative error is meaningless
  # where the output crosses zero.
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error < rtol, error


def _numpy_bn_eval(y, params, state, axis):
  shape = [1] * y.ndim
  shape[axis] = -1
  mean, var = np.asarray(state.mean, np.float64), np.asarray(state.var, np.float64)
  out = (np.asarray(y, np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape)
                                                                     + EPSILON)
  if params is not None:
    out = out * np.asarray(params.scale).reshape(shape) + np.asarray(
        params.bias).reshape(shape)
  return out


# (input layout, kernel layout, BN feature axis, groups)
CONV_CASES = [
    ("NHWC", "HWIO", -1, 1),
    ("NCHW", "OIHW", 1, 1),
    ("NHWC", "HWIO", -1, "depthwise"),
    ("NCHW", "OIHW", 1, "depthwise"),
    ("NHWC", "HWIO", -1, 2),
]


@pytest.mark.parametrize("input_layout,kernel_layout,bn_axis,groups", CONV_CASES)
@pytest.mark.parametrize("with_bias,affine", [(True, True), (False, False)])
def test_folded_conv_equals_conv_then_bn(input_layout, kernel_layout, bn_axis, groups,
                                         with_bias, affine):
  in_channels, multiplier = 4, 3
  groups = in_channels if groups == "depthwise" else groups
  out_channels = 6 if groups == 2 else in_channels * multiplier
  rng = np.random.default_rng(0)
  hwio = _normal(rng, (3, 3, in_channels // groups, out_channels))
  kernel = hwio if kernel_layout == "HWIO" else hwio.transpose(3, 2, 0, 1)
  bias = _normal(rng, (out_channels,)) if with_bias else None
  x = _normal(rng, (2, 7, 7, in_channels))
  if input_layout == "NCHW":
    x = x.transpose(0, 3, 1, 2)
  params, state = _trained_bn(rng, out_channels, affine=affine)
  numbers = (input_layout, kernel_layout, input_layout)

  def conv(kernel, bias):
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=numbers,
                                 feature_group_count=groups)
    if bias is not None:
      y = y + bias.reshape((1, -1, 1, 1) if input_layout == "NCHW" else (1, 1, 1, -1))
    return y

  conv_then_bn, _ = jaxbn.batch_norm(params, state, conv(kernel, bias), training=False,
                                     axis=bn_axis, epsilon=EPSILON)
  folded = jaxbn.fold_into_conv(kernel, bias, params, state, epsilon=EPSILON,
                                kernel_layout=kernel_layout)
  assert folded[0].shape == kernel.shape and folded[1].shape == (out_channels,)
  _assert_close_relative(conv(*folded), conv_then_bn)
  # And against a float64 NumPy batch norm of the same conv output.
  _assert_close_relative(conv(*folded),
                         _numpy_bn_eval(conv(kernel, bias), params, state, bn_axis))


@pytest.mark.parametrize("with_bias,affine", [(True, True), (False, True), (True, False)])
def test_folded_dense_equals_dense_then_bn(with_bias, affine):
  rng = np.random.default_rng(1)
  kernel = _normal(rng, (5, 7))
  bias = _normal(rng, (7,)) if with_bias else None
  x = _normal(rng, (9, 5))
  params, state = _trained_bn(rng, 7, affine=affine)
  dense = x @ kernel + (0 if bias is None else bias[None])
  expected = _numpy_bn_eval(dense, params, state, -1)
  folded_kernel, folded_bias = jax.jit(
      lambda *a: jaxbn.fold_into_dense(*a, epsilon=EPSILON))(kernel, bias, params, state)
  _assert_close_relative(x @ folded_kernel + folded_bias[None], expected)


def test_fold_under_jit_with_static_layout_and_keeps_dtypes():
  params, state = _trained_bn(np.random.default_rng(2), 8)
  kernel = jnp.ones((8, 4, 3, 3), jnp.bfloat16)
  fold = jax.jit(jaxbn.fold_into_conv, static_argnames=("kernel_layout",))
  folded_kernel, folded_bias = fold(kernel, None, params, state, kernel_layout="OIHW")
  assert folded_kernel.dtype == jnp.bfloat16 and folded_bias.dtype == jnp.bfloat16
  expected = np.asarray(params.scale) / np.sqrt(np.asarray(state.var) + 1e-5)
  np.testing.assert_allclose(np.asarray(folded_kernel[:, 0, 0, 0], np.float32), expected,
                             rtol=1e-2)


def test_fold_errors_name_the_argument():
  params, state = _trained_bn(np.random.default_rng(3), 6)
  kernel = jnp.ones((3, 3, 2, 6))
  with pytest.raises(ValueError, match="kernel_layout"):
    jaxbn.fold_into_conv(kernel, None, params, state, kernel_layout="HWI")
  with pytest.raises(ValueError, match="kernel_layout"):
    jaxbn.fold_into_conv(kernel, None, params, state, kernel_layout="HWOO")
  with pytest.raises(TypeError, match="kernel_layout"):
    jaxbn.fold_into_conv(kernel, None, params, state, kernel_layout=None)
  # OIHW reads the output channels from axis 0, which has 3 here, not 6.
  with pytest.raises(ValueError, match=r"state.mean has shape \(6,\).*3 output channels"):
    jaxbn.fold_into_conv(kernel, None, None, state, kernel_layout="OIHW")
  with pytest.raises(ValueError, match=r"params.scale has shape \(6,\)"):
    jaxbn.fold_into_dense(jnp.ones((6, 4)), None, params, state)
  with pytest.raises(ValueError, match="bias has shape"):
    jaxbn.fold_into_conv(kernel, jnp.ones(5), params, state)
  with pytest.raises(ValueError, match=r"\(in_features, out_features\)"):
    jaxbn.fold_into_dense(kernel, None, params, state)
  with pytest.raises(TypeError, match="kernel must have a floating-point dtype"):
    jaxbn.fold_into_dense(jnp.ones((2, 6), jnp.int32), None, params, state)
  with pytest.raises(ValueError, match="epsilon"):
    jaxbn.fold_into_dense(jnp.ones((2, 6)), None, params, state, epsilon=0.0)
  with pytest.raises(ValueError, match="state.mean is missing"):
    jaxbn.fold_into_dense(jnp.ones((2, 6)), None, params, None)
