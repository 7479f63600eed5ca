"""Models as pure functions over parameter and batch-norm-state pytrees.

A model is a `Model(init, apply, layers, input_shape, module)`:

```python
model = models.mnist_cnn(input_shape=(28, 28, 1), num_classes=10)
params, state = model.init(jax.random.key(0))
logits, new_state = model.apply(params, state, images, training=True)
```

`params` and `state` are dicts keyed by layer name: conv/dense layers hold
`{'kernel', 'bias'}`, batch-norm layers hold `jaxbn.BatchNormParams` in
`params` and `jaxbn.BatchNormState` (float32 running statistics) in `state`.
Images are NHWC; logits are float32 of shape `(batch, num_classes)`.

The MNIST CNN and the MLP are built from `Layer`s (a small sequential stack of
pure functions), which also gives the Keras-style parameter table
(`parameter_table`). The ResNets (`training.resnet`) are flax.linen modules
with `jaxbn.linen.BatchNorm`; `linen_model` wraps one into the same `Model`
interface (`params` = the `params` collection, `state` = `batch_stats`), so
`train_lib` drives both kinds the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
import functools
import math
from typing import Any, Callable, NamedTuple

from flax import linen as nn
import jax
from jax import lax
import jax.numpy as jnp

import jaxbn
from training import resnet

Params = dict[str, Any]
State = dict[str, Any]

# Keras' BatchNormalization defaults (the Keras MNIST CNN of the notes uses them).
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

  Attributes:
    init: `key -> (params, state)`.
    apply: as above.
    layers: the `Layer`s of a sequential model; `()` for a linen model.
    input_shape: `(height, width, channels)` of one example.
    module: the flax.linen module of a `linen_model`, else None.
  """
  init: Callable[[jax.Array], tuple[Params, State]]
  apply: Callable[..., tuple[jax.Array, State]]
  layers: tuple[Layer, ...]
  input_shape: tuple[int, ...]
  module: Any = None


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

  The platform the program is compiled for picks the algorithm, when it is
  lowered (`lax.platform_dependent`), not the machine that traces it: a
  program lowered on a CPU for GPUs or TPUs (`jax.export`, `train.py
  --lower_for`) holds `conv_valid_xla` (cuDNN / the TPU convolution units),
  and one compiled for CPU holds `conv_valid_cpu` (im2col and matmuls; the
  one-channel first layer with a hand-written backward pass): for the few
  channels of the MNIST CNN, XLA:CPU's convolution is slower on the first
  layer (measured on its training step, batch 128) and no faster on the
  second. Both give the same numbers up to float rounding
  (tests/test_train_models.py).

  Args:
    x: `(batch, height, width, in_features)`.
    kernel: `(kernel_height, kernel_width, in_features, out_features)`.

  Returns:
    `(batch, height - kernel_height + 1, width - kernel_width + 1,
    out_features)`.
  """
  return lax.platform_dependent(x, kernel, cpu=conv_valid_cpu, default=conv_valid_xla)


def conv_valid_in_loops(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` for models stepped inside `lax.map` / `lax.scan` loops.

  On CPU, `conv_valid_im2col` (im2col with the automatic gradient): in the
  experiments' harness, which steps several model instances one after the
  other inside a scan, XLA:CPU runs the MNIST CNN's training step ~2.4x faster
  with it than with `conv_valid_cpu` (which is the faster one in a plain
  jitted step). Elsewhere `conv_valid_xla`. Same shapes and numbers as
  `conv_valid` up to float rounding.
  """
  return lax.platform_dependent(x, kernel, cpu=conv_valid_im2col, default=conv_valid_xla)


def conv_valid_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` as im2col (the shifted views, concatenated) and one matmul."""
  patches, taps = _im2col(x, kernel)
  return patches @ taps


def _im2col(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(patches, taps)`: `(batch, out_h, out_w, kh*kw*in)` patches, `(kh*kw*in, out)` taps.

  The patches' feature order (kh, kw, in) matches the row-major reshape of HWIO.
  """
  kernel_height, kernel_width, in_features, out_features = kernel.shape
  patches = jnp.concatenate(_shifted_windows(x, kernel_height, kernel_width), axis=-1)
  return patches, kernel.reshape(kernel_height * kernel_width * in_features, out_features)


def conv_valid_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` as one `lax.conv_general_dilated` (GPUs, TPUs)."""
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


def _conv_valid_one_channel_forward(x, kernel):
  kernel_height, kernel_width, _, out_features = kernel.shape
  windows = _shifted_windows(x, kernel_height, kernel_width)
  taps = kernel.reshape(kernel_height * kernel_width, out_features)
  # Taps on the leading axis, (taps, batch * out_height * out_width): each
  # row is one contiguous copy of a window. The usual patch matrix with one
  # channel per tap would be written one float at a time (measured: the
  # concatenation alone was 9 of the step's 61 ms of op time at batch 128).
  patches = jnp.stack([window[..., 0] for window in windows], axis=0).reshape(
      len(windows), -1)
  y = lax.dot_general(patches, taps, (((0,), (0,)), ((), ())))
  return y.reshape(windows[0].shape[:3] + (out_features,)), (x, kernel, patches)


def _conv_valid_one_channel_backward(residuals, dy):
  x, kernel, patches = residuals
  dkernel = patches @ dy.reshape(-1, kernel.shape[-1])
  # The input gradient is XLA's transposed convolution, one op. When `x` is
  # data (the first layer) it is dead code and XLA removes it.
  _, conv_vjp = jax.vjp(lambda x: conv_valid_xla(x, kernel), x)
  (dx,) = conv_vjp(dy)
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


@jax.custom_vjp
def _conv_valid_one_channel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` of a one-channel `x`: tap-major patches, hand-written gradient."""
  return _conv_valid_one_channel_forward(x, kernel)[0]


_conv_valid_one_channel.defvjp(_conv_valid_one_channel_forward,
                               _conv_valid_one_channel_backward)


def conv_valid_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv_valid` as im2col and matmuls, for XLA:CPU.

  One input channel (the first layer): the patch matrix laid out tap-major,
  `(kh * kw, batch * out_h * out_w)`, one contiguous copy per tap, times the
  reshaped kernel; its gradient is written by hand (the kernel gradient is
  one matmul of the saved patches with `dy`, the input gradient
  `lax.conv_general_dilated`'s transpose, dead code for data). More channels:
  `conv_valid_im2col` and its automatic gradient (the transpose of the
  concatenation: slices and pads that XLA fuses with their neighbours),
  measured faster on XLA:CPU for the MNIST CNN's second layer than the
  saved-patch kernel gradient with a transposed convolution for the input
  gradient (BENCHMARKS.md, the peers section). Same shapes as `conv_valid`.
  """
  if kernel.shape[2] == 1:
    return _conv_valid_one_channel(x, kernel)
  return conv_valid_im2col(x, kernel)


def conv2d(name: str, features: int, kernel_size: int, *, use_bias: bool = True,
           kernel_init=glorot_uniform, conv: Callable = conv_valid) -> Layer:
  """Valid (unpadded) stride-1 convolution, NHWC input, HWIO kernel.

  `conv` computes it (`conv_valid`; `conv_valid_in_loops` for models stepped
  inside loops).
  """
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
    y = conv(x.astype(dtype), params["kernel"].astype(dtype))
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
  of op time in the MNIST CNN's step at batch 128); reduce_window's
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


def mnist_cnn(input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10, *,
             use_bn: bool = True, bias_before_bn: bool = True,
             batch_norm_layer: BatchNormFactory = batch_norm,
             conv: Callable = conv_valid) -> Model:
  """The Keras MNIST CNN.

  Conv 10@5x5 -> BN -> ReLU -> MaxPool 2 -> Conv 20@5x5 -> BN -> ReLU ->
  MaxPool 2 -> Flatten -> Dense 100 -> BN -> ReLU -> Dense num_classes.
  On 28x28x1 inputs with biases: 38,650 trainable numbers and 260 running
  statistics (the Keras `model.summary()` of the batch-norm notes,
  docs/evidence.md).

  Args:
    input_shape: `(height, width, channels)` of one image.
    num_classes: number of logits.
    use_bn: False drops the three BN layers (conv/dense keep their bias).
    bias_before_bn: False drops the conv/dense bias in front of each BN (BN's
      beta replaces it, as in the BN paper).
    batch_norm_layer: `name -> Layer` factory of the BN layers; the default is
      jaxbn with Keras' momentum and epsilon (benchmarks swap in other BNs).
    conv: the convolution of both conv layers (`conv2d`).
  """
  hidden_bias = bias_before_bn or not use_bn

  def maybe_bn(name):
    return [batch_norm_layer(name)] if use_bn else []

  layers = [
      conv2d("conv1", 10, 5, use_bias=hidden_bias, conv=conv), *maybe_bn("bn1"), relu("relu1"),
      max_pool("pool1"),
      conv2d("conv2", 20, 5, use_bias=hidden_bias, conv=conv), *maybe_bn("bn2"), relu("relu2"),
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


def linen_model(module: nn.Module, input_shape: tuple[int, ...]) -> Model:
  """Wraps a flax.linen classifier into the `Model` interface.

  `params` is the module's `params` collection and `state` its `batch_stats`
  (flax's `{'mean', 'var'}` per BN layer). `apply` clones the module with
  `dtype=compute_dtype`, `axis_name=bn_axis_name` and
  `axis_index_groups=bn_axis_index_groups`, so the module must have these
  attributes (as `training.resnet.ResNet` does) and call it as
  `module(x, train=...)`.

  Args:
    module: the linen module, e.g. `resnet.ResNet20(num_classes=10)`.
    input_shape: `(height, width, channels)` of one example.
  """
  input_shape = tuple(int(d) for d in input_shape)

  def init(key: jax.Array) -> tuple[Params, State]:
    variables = module.init(key, jnp.zeros((1,) + input_shape, jnp.float32),
                            train=False)
    return variables["params"], variables.get("batch_stats", {})

  def apply(params: Params, state: State, x: jax.typing.ArrayLike, training: bool,
            *, bn_axis_name=None, bn_axis_index_groups=None,
            compute_dtype=jnp.float32) -> tuple[jax.Array, State]:
    x = jnp.asarray(x)
    if x.shape[1:] != input_shape:
      raise ValueError(f"x must have shape (batch,) + {input_shape}, got {x.shape}.")
    configured = module.clone(dtype=jnp.dtype(compute_dtype), axis_name=bn_axis_name,
                              axis_index_groups=bn_axis_index_groups)
    variables = {"params": params, "batch_stats": state}
    if not training:
      return configured.apply(variables, x, train=False).astype(jnp.float32), state
    logits, updates = configured.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits.astype(jnp.float32), updates["batch_stats"]

  return Model(init, apply, (), input_shape, module)


MODELS = {"cnn": mnist_cnn, "mlp": bn_paper_mlp, **resnet.RESNETS}


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
                 use_bn: bool = True, bias_before_bn: bool = True,
                 bn_momentum: float = KERAS_BN_MOMENTUM,
                 bn_epsilon: float = KERAS_BN_EPSILON,
                 zero_init_last_bn: bool = True, conv: Callable = conv_valid) -> Model:
  """Builds a model by name.

  'cnn': the MNIST CNN, 'mlp': the BN paper's MLP (sequential, pure
  functions); 'resnet20', 'resnet32', 'resnet56' (CIFAR-style), 'resnet18',
  'resnet34', 'resnet50' (ImageNet-style): `training.resnet` linen modules
  with `jaxbn.linen.BatchNorm`, wrapped by `linen_model`.

  Args:
    name: a key of `MODELS`.
    input_shape: `(height, width, channels)` of one example.
    num_classes: number of logits.
    use_bn: False removes batch norm (sequential models only).
    bias_before_bn: keep the conv/dense bias in front of each BN (sequential
      models only; the ResNets have none).
    bn_momentum, bn_epsilon: of every BN layer.
    zero_init_last_bn: ResNets only: zero scale on the last BN of each
      residual branch.
    conv: 'cnn' only: its convolution (`conv_valid_in_loops` for models
      stepped inside `lax.map` / `lax.scan`, as the experiments do).

  Raises:
    ValueError: unknown `name`, or a ResNet with `use_bn=False` or
      `bias_before_bn=True`.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.")
  if name in resnet.RESNETS:
    if not use_bn or bias_before_bn:
      raise ValueError(
          f"model {name!r} has batch norm after every convolution and no bias in "
          f"front of it; got use_bn={use_bn}, bias_before_bn={bias_before_bn} "
          "(set use_bn=True, bias_before_bn=False).")
    module = resnet.RESNETS[name](num_classes=num_classes, bn_momentum=bn_momentum,
                                  bn_epsilon=bn_epsilon,
                                  zero_init_last_bn=zero_init_last_bn)
    return linen_model(module, input_shape)

  def batch_norm_layer(layer_name):
    return batch_norm(layer_name, momentum=bn_momentum, epsilon=bn_epsilon)

  extra = {"conv": conv} if name == "cnn" else {}
  return MODELS[name](input_shape, num_classes, use_bn=use_bn,
                      bias_before_bn=bias_before_bn, batch_norm_layer=batch_norm_layer,
                      **extra)


# --- PreciseBN ----------------------------------------------------------------

class _TrainingForward(NamedTuple):
  """`(params, state, images) -> (logits, new_state)` in training mode.

  A NamedTuple so that equal forwards compare equal: `jaxbn.recompute_stats`
  jits with the forward static, and a new functools.partial per call would
  recompile every time.
  """
  apply: Callable[..., tuple[jax.Array, State]]
  compute_dtype: Any

  def __call__(self, params, state, images):
    return self.apply(params, state, images, True, compute_dtype=self.compute_dtype)


def recompute_bn_stats(model: Model, params: Params, state: State,
                       images: Iterable[jax.typing.ArrayLike], *, num_batches: int,
                       compute_dtype=jnp.float32) -> State:
  """PreciseBN: running statistics replaced by population statistics.

  Runs the training-mode forward pass over the first `num_batches` batches of
  `images` with fixed `params` and pools every BN layer's batch mean and
  variance with equal weight per batch (mean of the means; mean of the
  variances plus the variance of the means), as `jaxbn.recompute_stats`.

  Sequential models call `jaxbn.recompute_stats`, which finds their
  `jaxbn.BatchNormState`s; linen models (flax's `{'mean', 'var'}`
  `batch_stats`) call `jaxbn.linen.recompute_stats`. Both work on batches
  sharded over devices (the statistics are then global) and keep a feature's
  old values where the pooled ones are not finite.

  Args:
    model: the model.
    params: its parameters.
    state: its BN state (`init`'s second output).
    images: batches `(batch,) + model.input_shape`, e.g. training batches.
    num_batches: how many batches of `images` to use (>= 1).
    compute_dtype: activation dtype of the forward pass.

  Returns:
    `state` with new running means and variances.

  Raises:
    ValueError: fewer than `num_batches` batches.
  """
  compute_dtype = jnp.dtype(compute_dtype)
  if model.module is None:
    return jaxbn.recompute_stats(_TrainingForward(model.apply, compute_dtype), params,
                                 state, images, num_batches=num_batches)
  module = model.module.clone(dtype=compute_dtype)
  variables = {"params": params, "batch_stats": state}
  return jaxbn.linen.recompute_stats(module, variables, images, num_batches=num_batches,
                                     train=True)["batch_stats"]


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
  running means and variances. Nothing is computed (`jax.eval_shape`). A
  linen model has one row per top-level submodule (e.g. a residual block).
  """
  if model.module is not None:
    return _linen_parameter_table(model)
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


def _linen_parameter_table(model: Model) -> list[TableRow]:
  example = jnp.zeros((1,) + model.input_shape, jnp.float32)

  def run(key):
    variables = model.module.init(key, example, train=False)
    _, captured = model.module.apply(variables, example, train=False,
                                     capture_intermediates=True, mutable=["intermediates"])
    return variables, captured["intermediates"]

  variables, intermediates = jax.eval_shape(run, jax.random.key(0))
  kinds = {path: type(module).__name__ for path, module in
           model.module.module_paths(jax.random.key(0), example, train=False).items()}
  params, stats = variables["params"], variables.get("batch_stats", {})
  rows = []
  for name, kind in kinds.items():  # in the order the modules ran
    if name and "/" not in name:
      rows.append(TableRow(name, kind, tuple(intermediates[name]["__call__"][0].shape[1:]),
                           _size(params.get(name, {})), _size(stats.get(name, {}))))
  return rows


def format_parameter_table(rows: list[TableRow]) -> str:
  """Renders `parameter_table` rows with Keras' three totals."""
  names = [f"{row.layer} ({row.kind})" for row in rows]
  width = max([26] + [len(name) + 2 for name in names])
  lines = [f"{'Layer (type)':<{width}}{'Output shape':<22}{'Numbers':>10}",
           "-" * (width + 32)]
  for name, row in zip(names, rows):
    shape = "(None, " + ", ".join(str(d) for d in row.output_shape) + ")"
    lines.append(f"{name:<{width}}{shape:<22}{row.trainable + row.non_trainable:>10,}")
  trainable = sum(row.trainable for row in rows)
  non_trainable = sum(row.non_trainable for row in rows)
  lines += ["-" * (width + 32),
            f"Total numbers: {trainable + non_trainable:,}",
            f"Trainable: {trainable:,}",
            f"Non-trainable (BN running statistics): {non_trainable:,}"]
  return "\n".join(lines)
