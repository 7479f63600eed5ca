"""Convolution and max-pooling kernels of the MNIST models, for XLA:CPU and the rest.

All take NHWC inputs; kernels are HWIO. Every convolution here is a valid
(unpadded) stride-1 one and gives `lax.conv_general_dilated`'s numbers up to
float rounding (tests/training/test_train_models.py):

* `conv_lax`: one `lax.conv_general_dilated` (cuDNN, the TPU convolution units).
* `conv_im2col`: im2col (the shifted views, concatenated) and one matmul, with
  JAX's automatic gradient.
* `conv_im2col_one_channel`: one input channel only: the patch matrix laid out
  tap-major and a hand-written gradient.
* `conv_matmuls`: `conv_im2col_one_channel` for one input channel (a first
  layer), else `conv_im2col`.
* `conv_valid`: `conv_lax`, or the `cpu` kernel in programs compiled for CPU.

For the few channels of the MNIST CNN, XLA:CPU's own convolution is slower than
these matmuls; `python -m benchmarks.cpu_paths` times `conv_matmuls` against
`conv_im2col` inside the experiments' `lax.scan` loops, and BENCHMARKS.md (the
peers section) the plain jitted step.
"""

from __future__ import annotations

from typing import Callable
import functools

import jax
from jax import lax
import jax.numpy as jnp

ConvKernel = Callable[[jax.Array, jax.Array], jax.Array]


def conv_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid stride-1 convolution as one `lax.conv_general_dilated`.

  Args:
    x: `(batch, height, width, in_features)`.
    kernel: `(kernel_height, kernel_width, in_features, out_features)`.

  Returns:
    `(batch, height - kernel_height + 1, width - kernel_width + 1,
    out_features)`.
  """
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_valid(x: jax.Array, kernel: jax.Array, *, cpu: ConvKernel | None = None
               ) -> jax.Array:
  """`conv_lax`'s result, computed by `cpu` in programs compiled for CPU.

  The platform the program is compiled for picks the kernel when it is
  lowered (`lax.platform_dependent`), not the machine that traces it: a
  program lowered on a CPU for GPUs or TPUs (`jax.export`, `train.py
  --lower_for`) holds `conv_lax`.

  Args:
    x: `(batch, height, width, in_features)`.
    kernel: `(kernel_height, kernel_width, in_features, out_features)`.
    cpu: the CPU kernel; None: `conv_matmuls`.

  Returns:
    As `conv_lax`.
  """
  return lax.platform_dependent(x, kernel, cpu=cpu or conv_matmuls, default=conv_lax)


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_lax` as im2col and one matmul, with the automatic gradient.

  The gradient is the transpose of the concatenation (slices and pads that XLA
  fuses with their neighbours). Inside `lax.map` / `lax.scan` loops XLA:CPU
  runs the MNIST CNN's step faster with it than with `conv_matmuls`
  (`python -m benchmarks.cpu_paths`).
  """
  patches, taps = _im2col(x, kernel)
  return patches @ taps


def conv_matmuls(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_lax` as matmuls: `conv_im2col_one_channel` for one input channel, else `conv_im2col`.

  For more channels the im2col with the automatic gradient was measured faster
  on XLA:CPU for the MNIST CNN's second layer than a saved-patch kernel
  gradient with a transposed convolution for the input gradient
  (BENCHMARKS.md, the peers section).
  """
  if kernel.shape[2] == 1:
    return conv_im2col_one_channel(x, kernel)
  return conv_im2col(x, kernel)


def _im2col(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(patches, taps)`: `(batch, out_h, out_w, kh*kw*in)` patches, `(kh*kw*in, out)` taps.

  The patches' feature order (kh, kw, in) matches the row-major reshape of HWIO.
  """
  kernel_height, kernel_width, in_features, out_features = kernel.shape
  patches = jnp.concatenate(_shifted_windows(x, kernel_height, kernel_width), axis=-1)
  return patches, kernel.reshape(kernel_height * kernel_width * in_features, out_features)


def _shifted_windows(x: jax.Array, kernel_height: int, kernel_width: int
                     ) -> list[jax.Array]:
  """The `kernel_height * kernel_width` shifted views of `x`, in (kh, kw) order.

  Each is `x[:, i:i + out_height, j:j + out_width, :]`: the input pixels that
  kernel tap `(i, j)` multiplies.
  """
  out_height = x.shape[1] - kernel_height + 1
  out_width = x.shape[2] - kernel_width + 1
  return [x[:, i:i + out_height, j:j + out_width, :]
          for i in range(kernel_height) for j in range(kernel_width)]


def _one_channel_forward(x, kernel):
  kernel_height, kernel_width, _, out_features = kernel.shape
  windows = _shifted_windows(x, kernel_height, kernel_width)
  taps = kernel.reshape(kernel_height * kernel_width, out_features)
  # Taps on the leading axis, (taps, batch * out_height * out_width): each
  # row is one contiguous copy of a window, where the usual patch matrix with
  # one channel per tap would be written one float at a time.
  patches = jnp.stack([window[..., 0] for window in windows], axis=0).reshape(
      len(windows), -1)
  y = lax.dot_general(patches, taps, (((0,), (0,)), ((), ())))
  return y.reshape(windows[0].shape[:3] + (out_features,)), (x, kernel, patches)


def _one_channel_backward(residuals, dy):
  x, kernel, patches = residuals
  dkernel = patches @ dy.reshape(-1, kernel.shape[-1])
  # The input gradient is XLA's transposed convolution, one op. When `x` is
  # data (the first layer) it is dead code and XLA removes it.
  _, conv_vjp = jax.vjp(lambda x: conv_lax(x, kernel), x)
  (dx,) = conv_vjp(dy)
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


@jax.custom_vjp
def conv_im2col_one_channel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_lax` of a one-channel `x`: tap-major patches and a hand-written gradient.

  The patch matrix is `(kh * kw, batch * out_h * out_w)`, one contiguous copy
  per tap, times the reshaped kernel; the kernel gradient is one matmul of the
  saved patches with `dy`, the input gradient `lax.conv_general_dilated`'s
  transpose (dead code when `x` is data).

  Args:
    x: `(batch, height, width, 1)`.
    kernel: `(kernel_height, kernel_width, 1, out_features)`.
  """
  return _one_channel_forward(x, kernel)[0]


conv_im2col_one_channel.defvjp(_one_channel_forward, _one_channel_backward)


def _window_view(x: jax.Array, window: int) -> jax.Array:
  """`(B, H, W, C)` -> `(B, H // w, w, W // w, w, C)`; partial windows dropped."""
  batch, height, width, channels = x.shape
  height, width = height // window, width // window
  x = x[:, :height * window, :width * window, :]
  return x.reshape(batch, height, window, width, window, channels)


def _max_pool_forward(x, window):
  y = _window_view(x, window).max(axis=(2, 4))
  return y, (x, y)


def _max_pool_backward(window, residuals, dy):
  x, y = residuals
  windows = _window_view(x, window)
  batch, height, _, width, _, channels = windows.shape
  # Only the first maximum of each window (row-major order) gets the
  # gradient, as in lax.reduce_window's and PyTorch's max pooling.
  position = (lax.broadcasted_iota(jnp.int32, windows.shape, 2) * window
              + lax.broadcasted_iota(jnp.int32, windows.shape, 4))
  first = jnp.min(jnp.where(windows == y[:, :, None, :, None, :], position,
                            window * window), axis=(2, 4))
  dwindows = jnp.where(position == first[:, :, None, :, None, :],
                       dy[:, :, None, :, None, :], jnp.zeros((), dy.dtype))
  dx = dwindows.reshape(batch, height * window, width * window, channels)
  # Rows and columns past the last whole window get no gradient.
  dx = jnp.pad(dx, ((0, 0), (0, x.shape[1] - height * window),
                    (0, x.shape[2] - width * window), (0, 0)))
  return (dx,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_2d(x: jax.Array, window: int = 2) -> jax.Array:
  """Non-overlapping max pooling of NHWC `x` over `window x window` windows.

  The same values as `lax.reduce_window(x, -inf, lax.max, ...)` with 'VALID'
  padding (rows and columns past the last whole window are dropped, as in
  Keras' MaxPooling2D), computed as a max over a reshaped view. The gradient
  goes to the first maximum of each window (row-major), as reduce_window's
  and PyTorch's; it is written by hand as one small reduction (the position
  of that maximum) and one elementwise pass. The automatic gradient of the
  reshaped max splits ties and counts them per window, and reduce_window's
  select-and-scatter gradient is slower on XLA:CPU.

  Args:
    x: `(batch, height, width, channels)`.
    window: window size and stride.

  Returns:
    `(batch, height // window, width // window, channels)`.
  """
  return _max_pool_forward(x, window)[0]


max_pool_2d.defvjp(lambda x, window: _max_pool_forward(x, window), _max_pool_backward)
