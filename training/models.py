"""Models as pure functions over parameter and batch-norm-state pytrees.

A model is a `Model(init, apply, layers, input_shape)`:

```python
model = models.seed_cnn(input_shape=(28, 28, 1), num_classes=10)
params, state = model.init(jax.random.key(0))
logits, new_state = model.apply(params, state, images, training=True)
```

`params` and `state` are dicts keyed by layer name: conv/dense layers hold
`{'kernel', 'bias'}`, batch-norm layers hold `jaxbn.BatchNormParams` in
`params` and `jaxbn.BatchNormState` (float32 running statistics) in `state`.
Images are NHWC; logits are float32 of shape `(batch, num_classes)`.

Models are built from `Layer`s (a small sequential stack), which also gives
the Keras-style parameter table (`parameter_table`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

import jaxbn

Params = dict[str, Any]
State = dict[str, Any]

# Keras' BatchNormalization defaults (the seed's network uses them).
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3


class ApplyContext(NamedTuple):
  """Per-call settings that every layer sees.

  Attributes:
    training: Python bool; batch statistics (True) or running statistics.
    bn_axis_name: mapped axis name for cross-device batch statistics (only
      inside `shard_map`/`vmap`; under plain `jit` statistics are already
      global), or None.
    bn_axis_index_groups: replica groups that pool statistics, or None.
    compute_dtype: dtype of activations and matmuls (params stay float32).
  """
  training: bool
  bn_axis_name: Any = None
  bn_axis_index_groups: Any = None
  compute_dtype: Any = jnp.float32


class Layer(NamedTuple):
  """One layer as a pair of pure functions.

  Attributes:
    name: key of the layer's entries in `params` / `state`.
    kind: the layer type shown in the parameter table.
    init: `(key, input_shape) -> (params | None, state | None, output_shape)`;
      shapes exclude the batch axis.
    apply: `(params, state, x, context) -> (y, new_state)`.
  """
  name: str
  kind: str
  init: Callable[..., tuple[Any, Any, tuple[int, ...]]]
  apply: Callable[..., tuple[jax.Array, Any]]


class Model(NamedTuple):
  """A model: `init(key) -> (params, state)` and `apply(...) -> (logits, state)`.

  `apply(params, state, x, training, *, bn_axis_name=None,
  bn_axis_index_groups=None, compute_dtype=jnp.float32)`: `x` is a float batch
  of shape `(batch,) + input_shape`; returns float32 logits and the new state
  (equal to `state` when `training=False`).
  """
  init: Callable[[jax.Array], tuple[Params, State]]
  apply: Callable[..., tuple[jax.Array, State]]
  layers: tuple[Layer, ...]
  input_shape: tuple[int, ...]


class TableRow(NamedTuple):
  """One row of `parameter_table`: numbers held by one layer."""
  layer: str
  kind: str
  output_shape: tuple[int, ...]
  trainable: int
  non_trainable: int


# --- layers -----------------------------------------------------------------

glorot_uniform = jax.nn.initializers.glorot_uniform()  # Keras' default kernel init.


def _broadcast_features(vector: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a per-feature vector to broadcast over `like`'s last axis."""
  return vector.reshape((1,) * (like.ndim - 1) + vector.shape)


def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Valid (unpadded) stride-1 convolution of NHWC `x` with an HWIO `kernel`.

  On CPU it is `conv_valid_cpu` (im2col and matmuls with a hand-written
  backward pass): for the few channels of the seed CNN, XLA:CPU's
  convolution and the automatic gradient of im2col are several times slower
  (measured on its training step, batch 32-128). Elsewhere it is
  `lax.conv_general_dilated` (cuDNN / the TPU convolution units). Both give
  the same numbers up to float rounding (tests/test_train_models.py).

  Args:
    x: `(batch, height, width, in_features)`.
    kernel: `(kernel_height, kernel_width, in_features, out_features)`.

  Returns:
    `(batch, height - kernel_height + 1, width - kernel_width + 1,
    out_features)`.
  """
  if jax.default_backend() != "cpu":
    return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return conv_valid_cpu(x, kernel)


def _lax_conv_valid(x, kernel):
  return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding="VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


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


def _conv_valid_cpu_forward(x, kernel):
  kernel_height, kernel_width, in_features, out_features = kernel.shape
  windows = _shifted_windows(x, kernel_height, kernel_width)
  taps = kernel.reshape(kernel_height * kernel_width * in_features, out_features)
  if in_features == 1:
    # Taps on the leading axis, (taps, batch * out_height * out_width): each
    # row is one contiguous copy of a window. The usual patch matrix with one
    # channel per tap would be written one float at a time (measured: the
    # concatenation alone was 9 of the step's 61 ms of op time at batch 128).
    patches = jnp.stack([window[..., 0] for window in windows], axis=0).reshape(
        len(windows), -1)
    y = lax.dot_general(patches, taps, (((0,), (0,)), ((), ())))
    return y.reshape(windows[0].shape[:3] + (out_features,)), (x, kernel, patches)
  # im2col: feature order (kh, kw, in) matches the row-major reshape of HWIO.
  patches = jnp.concatenate(windows, axis=-1)
  return patches @ taps, (x, kernel, patches.reshape(-1, patches.shape[-1]))


def _conv_valid_cpu_backward(residuals, dy):
  x, kernel, patches = residuals
  out_features = kernel.shape[-1]
  flat_dy = dy.reshape(-1, out_features)
  if kernel.shape[2] == 1:
    dkernel = patches @ flat_dy
  else:
    dkernel = lax.dot_general(patches, flat_dy, (((0,), (0,)), ((), ())))
  # The input gradient is XLA's transposed convolution: one op, where the
  # transpose of the im2col concatenation is kh*kw slices and pads that
  # XLA:CPU runs as separate passes (~8 of 61 ms). When `x` is data (the
  # first layer) it is dead code and XLA removes it.
  _, conv_vjp = jax.vjp(lambda x: _lax_conv_valid(x, kernel), x)
  (dx,) = conv_vjp(dy)
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


@jax.custom_vjp
def conv_valid_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` as im2col and matmuls, with a hand-written gradient.

  Forward: the patch matrix (the `kh * kw` shifted views of `x`; with one
  input channel laid out tap-major) times the reshaped kernel. Backward: the
  kernel gradient is one matmul of the saved patches with `dy`; the input
  gradient is `lax.conv_general_dilated`'s transpose. Same shapes as
  `conv_valid`.
  """
  return _conv_valid_cpu_forward(x, kernel)[0]


conv_valid_cpu.defvjp(_conv_valid_cpu_forward, _conv_valid_cpu_backward)


def conv2d(name: str, features: int, kernel_size: int, *, use_bias: bool = True,
           kernel_init=glorot_uniform) -> Layer:
  """Valid (unpadded) stride-1 convolution, NHWC input, HWIO kernel."""
  def init(key, input_shape):
    height, width, in_features = input_shape
    kernel = kernel_init(key, (kernel_size, kernel_size, in_features, features),
                         jnp.float32)
    params = {"kernel": kernel}
    if use_bias:
      params["bias"] = jnp.zeros((features,), jnp.float32)
    out_shape = (height - kernel_size + 1, width - kernel_size + 1, features)
    return params, None, out_shape

  def apply(params, state, x, context):
    dtype = context.compute_dtype
    y = conv_valid(x.astype(dtype), params["kernel"].astype(dtype))
    if "bias" in params:
      y = y + _broadcast_features(params["bias"].astype(dtype), y)
    return y, state

  return Layer(name, "Conv2D", init, apply)


def dense(name: str, features: int, *, use_bias: bool = True,
          kernel_init=glorot_uniform) -> Layer:
  """Fully connected layer over the last axis."""
  def init(key, input_shape):
    (in_features,) = input_shape
    params = {"kernel": kernel_init(key, (in_features, features), jnp.float32)}
    if use_bias:
      params["bias"] = jnp.zeros((features,), jnp.float32)
    return params, None, (features,)

  def apply(params, state, x, context):
    dtype = context.compute_dtype
    y = x.astype(dtype) @ params["kernel"].astype(dtype)
    if "bias" in params:
      y = y + _broadcast_features(params["bias"].astype(dtype), y)
    return y, state

  return Layer(name, "Dense", init, apply)


def batch_norm(name: str, *, momentum: float = KERAS_BN_MOMENTUM,
               epsilon: float = KERAS_BN_EPSILON) -> Layer:
  """jaxbn batch normalization over the last (feature / channel) axis.

  Parameters are float32; in half precision the input stays bf16 and jaxbn
  computes statistics in float32 and keeps float32 running statistics.
  """
  def init(key, input_shape):
    del key
    params, state = jaxbn.init(input_shape[-1])
    return params, state, input_shape

  def apply(params, state, x, context):
    return jaxbn.batch_norm(
        params, state, x, training=context.training, axis=-1, momentum=momentum,
        epsilon=epsilon, axis_name=context.bn_axis_name,
        axis_index_groups=context.bn_axis_index_groups)

  return Layer(name, "BatchNorm", init, apply)


def _stateless(name: str, kind: str, fn: Callable[[jax.Array], jax.Array],
               shape_fn: Callable[[tuple[int, ...]], tuple[int, ...]] = lambda s: s
               ) -> Layer:
  def init(key, input_shape):
    del key
    return None, None, shape_fn(input_shape)

  def apply(params, state, x, context):
    del params, context
    return fn(x), state

  return Layer(name, kind, init, apply)


def relu(name: str) -> Layer:
  return _stateless(name, "ReLU", jax.nn.relu)


def sigmoid(name: str) -> Layer:
  return _stateless(name, "Sigmoid", jax.nn.sigmoid)


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
  reshaped max splits ties and counts them per window (measured: 10 of 61 ms
  of op time in the seed CNN's step at batch 128); reduce_window's
  select-and-scatter gradient is slower still on XLA:CPU.

  Args:
    x: `(batch, height, width, channels)`.
    window: window size and stride.

  Returns:
    `(batch, height // window, width // window, channels)`.
  """
  return _max_pool_forward(x, window)[0]


max_pool_2d.defvjp(lambda x, window: _max_pool_forward(x, window), _max_pool_backward)


def max_pool(name: str, window: int = 2) -> Layer:
  """Non-overlapping `window x window` max pooling (Keras MaxPooling2D, valid)."""
  def shape_fn(shape):
    height, width, channels = shape
    return (height // window, width // window, channels)

  return _stateless(name, "MaxPool2D", lambda x: max_pool_2d(x, window), shape_fn)


def flatten(name: str) -> Layer:
  return _stateless(name, "Flatten", lambda x: x.reshape(x.shape[0], -1),
                    lambda shape: (math.prod(shape),))


# --- models -----------------------------------------------------------------

def sequential(layers: list[Layer] | tuple[Layer, ...],
               input_shape: tuple[int, ...]) -> Model:
  """Chains `layers` into a `Model` for inputs of shape `(batch,) + input_shape`.

  Raises:
    ValueError: two layers share a name.
  """
  layers = tuple(layers)
  names = [layer.name for layer in layers]
  if len(set(names)) != len(names):
    raise ValueError(f"layer names must be unique, got {names}.")
  input_shape = tuple(int(d) for d in input_shape)

  def init(key: jax.Array) -> tuple[Params, State]:
    params, state = {}, {}
    shape = input_shape
    for layer, layer_key in zip(layers, jax.random.split(key, len(layers))):
      layer_params, layer_state, shape = layer.init(layer_key, shape)
      if layer_params is not None:
        params[layer.name] = layer_params
      if layer_state is not None:
        state[layer.name] = layer_state
    return params, state

  def apply(params: Params, state: State, x: jax.typing.ArrayLike, training: bool,
            *, bn_axis_name=None, bn_axis_index_groups=None,
            compute_dtype=jnp.float32) -> tuple[jax.Array, State]:
    x = jnp.asarray(x)
    if x.shape[1:] != input_shape:
      raise ValueError(f"x must have shape (batch,) + {input_shape}, got {x.shape}.")
    context = ApplyContext(training, bn_axis_name, bn_axis_index_groups,
                           jnp.dtype(compute_dtype))
    new_state = {}
    for layer in layers:
      x, layer_state = layer.apply(params.get(layer.name), state.get(layer.name),
                                   x, context)
      if layer_state is not None:
        new_state[layer.name] = layer_state
    return x.astype(jnp.float32), new_state

  return Model(init, apply, layers, input_shape)


BatchNormFactory = Callable[[str], Layer]


def seed_cnn(input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10, *,
             use_bn: bool = True, bias_before_bn: bool = True,
             batch_norm_layer: BatchNormFactory = batch_norm) -> Model:
  """The seed's Keras CNN.

  Conv 10@5x5 -> BN -> ReLU -> MaxPool 2 -> Conv 20@5x5 -> BN -> ReLU ->
  MaxPool 2 -> Flatten -> Dense 100 -> BN -> ReLU -> Dense num_classes.
  On 28x28x1 inputs with biases: 38,650 trainable numbers and 260 running
  statistics (the seed's table).

  Args:
    input_shape: `(height, width, channels)` of one image.
    num_classes: number of logits.
    use_bn: False drops the three BN layers (conv/dense keep their bias).
    bias_before_bn: False drops the conv/dense bias in front of each BN (BN's
      beta replaces it, as in the BN paper).
    batch_norm_layer: `name -> Layer` factory of the BN layers; the default is
      jaxbn with Keras' momentum and epsilon (benchmarks swap in other BNs).
  """
  hidden_bias = bias_before_bn or not use_bn

  def maybe_bn(name):
    return [batch_norm_layer(name)] if use_bn else []

  layers = [
      conv2d("conv1", 10, 5, use_bias=hidden_bias), *maybe_bn("bn1"), relu("relu1"),
      max_pool("pool1"),
      conv2d("conv2", 20, 5, use_bias=hidden_bias), *maybe_bn("bn2"), relu("relu2"),
      max_pool("pool2"),
      flatten("flatten"),
      dense("dense1", 100, use_bias=hidden_bias), *maybe_bn("bn3"), relu("relu3"),
      dense("dense2", num_classes),
  ]
  return sequential(layers, input_shape)


def bn_paper_mlp(input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10, *,
                 use_bn: bool = True, bias_before_bn: bool = True,
                 hidden_features: int = 100, num_hidden_layers: int = 3,
                 batch_norm_layer: BatchNormFactory = batch_norm) -> Model:
  """The BN paper's MNIST network (Ioffe & Szegedy 2015, section 4.1).

  Flatten -> 3 x (Dense 100 -> BN -> sigmoid) -> Dense num_classes, with BN
  before each nonlinearity and small Gaussian initial weights.
  """
  hidden_bias = bias_before_bn or not use_bn
  kernel_init = jax.nn.initializers.lecun_normal()
  layers = [flatten("flatten")]
  for i in range(1, num_hidden_layers + 1):
    layers.append(dense(f"dense{i}", hidden_features, use_bias=hidden_bias,
                        kernel_init=kernel_init))
    if use_bn:
      layers.append(batch_norm_layer(f"bn{i}"))
    layers.append(sigmoid(f"sigmoid{i}"))
  layers.append(dense(f"dense{num_hidden_layers + 1}", num_classes,
                      kernel_init=kernel_init))
  return sequential(layers, input_shape)


MODELS = {"cnn": seed_cnn, "mlp": bn_paper_mlp}


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
                 use_bn: bool = True, bias_before_bn: bool = True,
                 bn_momentum: float = KERAS_BN_MOMENTUM,
                 bn_epsilon: float = KERAS_BN_EPSILON) -> Model:
  """Builds a model by name ('cnn': the seed CNN, 'mlp': the BN paper's MLP).

  Raises:
    ValueError: unknown `name`.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.")

  def batch_norm_layer(layer_name):
    return batch_norm(layer_name, momentum=bn_momentum, epsilon=bn_epsilon)

  return MODELS[name](input_shape, num_classes, use_bn=use_bn,
                      bias_before_bn=bias_before_bn, batch_norm_layer=batch_norm_layer)


# --- parameter table ----------------------------------------------------------

def _size(tree) -> int:
  return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _statistics_size(layer_state) -> int:
  """Running statistics of one layer; jaxbn's int32 update counter is not one."""
  if isinstance(layer_state, jaxbn.BatchNormState):
    return _size((layer_state.mean, layer_state.var))
  return _size(layer_state)


def parameter_table(model: Model) -> list[TableRow]:
  """Per-layer output shapes and number counts, like Keras' `model.summary()`.

  Trainable numbers are the leaves of `params`; non-trainable ones are the BN
  running means and variances. Nothing is computed (`jax.eval_shape`).
  """
  shapes = [model.input_shape]

  def init_layer(key, layer):
    layer_params, layer_state, output_shape = layer.init(key, shapes[-1])
    shapes.append(tuple(output_shape))  # static; kept out of the traced outputs
    return layer_params, layer_state

  rows = []
  for layer in model.layers:
    layer_params, layer_state = jax.eval_shape(
        lambda key, layer=layer: init_layer(key, layer), jax.random.key(0))
    rows.append(TableRow(layer.name, layer.kind, shapes[-1],
                         _size(layer_params), _statistics_size(layer_state)))
  return rows


def format_parameter_table(rows: list[TableRow]) -> str:
  """Renders `parameter_table` rows with Keras' three totals."""
  lines = [f"{'Layer (type)':<26}{'Output shape':<22}{'Numbers':>10}", "-" * 58]
  for row in rows:
    shape = "(None, " + ", ".join(str(d) for d in row.output_shape) + ")"
    lines.append(f"{row.layer + ' (' + row.kind + ')':<26}{shape:<22}"
                 f"{row.trainable + row.non_trainable:>10,}")
  trainable = sum(row.trainable for row in rows)
  non_trainable = sum(row.non_trainable for row in rows)
  lines += ["-" * 58,
            f"Total numbers: {trainable + non_trainable:,}",
            f"Trainable: {trainable:,}",
            f"Non-trainable (BN running statistics): {non_trainable:,}"]
  return "\n".join(lines)
