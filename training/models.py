"""The models of train.py, as flax.linen modules, and their Keras-style parameter table.

Every model takes NHWC images and `train` (batch statistics and an updated
`batch_stats` collection, which must be mutable, or the running statistics),
and returns float32 logits `(batch, num_classes)`. Parameters and BN running
statistics are float32; activations are in `dtype`:

```python
model = models.create_model("cnn", num_classes=10)
variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
```

* `MnistCNN`: the Keras MNIST CNN of the batch-norm notes.
* `BNPaperMLP`: the BN paper's MNIST network.
* the ResNets of `training.resnet`.

The normalization is an attribute (`norm`, `jaxbn.linen.BatchNorm` by default),
so comparisons swap in flax's or another BN by constructor argument; so is the
MNIST CNN's convolution (`conv`, `ValidConv`, whose CPU kernel is one of
`training.ops`'). Submodules are named as in the Keras table (`conv1`, `bn1`,
..., `dense2`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

from flax import linen as nn
import jax
import jax.numpy as jnp

from jaxbn import linen as jaxbn_linen
from training import ops
from training import resnet

ModuleDef = Any

# Keras' BatchNormalization defaults (the Keras MNIST CNN of the notes uses them).
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3

glorot_uniform = nn.initializers.glorot_uniform()  # Keras' default kernel init.


class ValidConv(nn.Module):
  """Valid (unpadded) stride-1 convolution, NHWC input, HWIO kernel (Keras' Conv2D).

  Computed by `ops.conv_valid`: `ops.conv_lax` in programs compiled for GPUs
  and TPUs, `cpu_kernel` in programs compiled for CPU.

  Attributes:
    features: output channels.
    kernel_size: height and width of the square kernel.
    use_bias: add a learned bias.
    dtype: dtype of the computation (the float32 parameters are cast to it).
    kernel_init: initializer of the kernel.
    cpu_kernel: `(x, kernel) -> y` on CPU: `ops.conv_matmuls` (a plain jitted
      step) or `ops.conv_im2col` (models stepped inside `lax.map`/`lax.scan`).
  """
  features: int
  kernel_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable = glorot_uniform
  cpu_kernel: ops.ConvKernel = ops.conv_matmuls

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, size, jnp.float32)
    y = ops.conv_valid(x.astype(self.dtype), kernel.astype(self.dtype), cpu=self.cpu_kernel)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype).reshape((1, 1, 1, self.features))
    return y


# The convolution of models stepped one instance after another inside
# `lax.map` / `lax.scan` (the experiments' harness, `training.instances`).
LoopConv = functools.partial(ValidConv, cpu_kernel=ops.conv_im2col)


def _norm(model: nn.Module, train: bool) -> ModuleDef:
  """`model.norm` with the attributes every norm of `model` shares."""
  return functools.partial(
      model.norm, use_running_average=not train, momentum=model.bn_momentum,
      epsilon=model.bn_epsilon, dtype=model.dtype, axis_name=model.axis_name,
      axis_index_groups=model.axis_index_groups)


# Parameter-free layers as modules, so that they are rows of `parameter_table`
# (Keras' `model.summary()` lists them).


class ReLU(nn.Module):
  """`nn.relu`."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(x)


class MaxPool2D(nn.Module):
  """Max pooling over non-overlapping `window` x `window` patches of NHWC input."""
  window: int = 2

  def __call__(self, x: jax.Array) -> jax.Array:
    return ops.max_pool_2d(x, self.window)


class Flatten(nn.Module):
  """`(batch, ...) -> (batch, features)`."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class MnistCNN(nn.Module):
  """The Keras MNIST CNN.

  Conv 10@5x5 -> BN -> ReLU -> MaxPool 2 -> Conv 20@5x5 -> BN -> ReLU ->
  MaxPool 2 -> Flatten -> Dense 100 -> BN -> ReLU -> Dense num_classes.
  On 28x28x1 inputs with biases: 38,650 trainable numbers and 260 running
  statistics (the Keras `model.summary()` of the batch-norm notes,
  docs/evidence.md; `python -m experiments.param_table`).

  Attributes:
    num_classes: number of logits.
    use_bn: False drops the three BN layers (conv/dense keep their bias).
    bias_before_bn: False drops the conv/dense bias in front of each BN (BN's
      beta replaces it, as in the BN paper).
    norm: normalization module class, called with `use_running_average`,
      `momentum`, `epsilon`, `dtype`, `axis_name`, `axis_index_groups`.
    conv: convolution module class of both conv layers (`ValidConv`, `LoopConv`).
    bn_momentum, bn_epsilon: of every BN (Keras' defaults).
    dtype: activation dtype; logits are float32.
    axis_name, axis_index_groups: of every BN (inside `jax.shard_map`).
  """
  num_classes: int = 10
  use_bn: bool = True
  bias_before_bn: bool = True
  norm: ModuleDef = jaxbn_linen.BatchNorm
  conv: ModuleDef = ValidConv
  bn_momentum: float = KERAS_BN_MOMENTUM
  bn_epsilon: float = KERAS_BN_EPSILON
  dtype: Any = jnp.float32
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = True) -> jax.Array:
    hidden_bias = self.bias_before_bn or not self.use_bn
    norm = _norm(self, train)

    def norm_relu(x, index):
      return ReLU(name=f"relu{index}")(norm(name=f"bn{index}")(x) if self.use_bn else x)

    conv = functools.partial(self.conv, use_bias=hidden_bias, dtype=self.dtype)
    x = norm_relu(conv(10, 5, name="conv1")(jnp.asarray(x)), 1)
    x = MaxPool2D(name="pool1")(x)
    x = norm_relu(conv(20, 5, name="conv2")(x), 2)
    x = Flatten(name="flatten")(MaxPool2D(name="pool2")(x))
    x = nn.Dense(100, use_bias=hidden_bias, dtype=self.dtype, kernel_init=glorot_uniform,
                 name="dense1")(x)
    x = norm_relu(x, 3)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=glorot_uniform,
                 name="dense2")(x)
    return x.astype(jnp.float32)


class BNPaperMLP(nn.Module):
  """The BN paper's MNIST network (Ioffe & Szegedy 2015, section 4.1).

  Flatten -> 3 x (Dense 100 -> BN -> sigmoid) -> Dense num_classes, with BN
  before each nonlinearity and small Gaussian initial weights (LeCun normal).

  Attributes:
    hidden_features, num_hidden_layers: the hidden layers' width and number.
    The others: as `MnistCNN`'s.
  """
  num_classes: int = 10
  use_bn: bool = True
  bias_before_bn: bool = True
  hidden_features: int = 100
  num_hidden_layers: int = 3
  norm: ModuleDef = jaxbn_linen.BatchNorm
  bn_momentum: float = KERAS_BN_MOMENTUM
  bn_epsilon: float = KERAS_BN_EPSILON
  dtype: Any = jnp.float32
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = True) -> jax.Array:
    norm = _norm(self, train)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.lecun_normal())
    x = jnp.asarray(x)
    x = x.reshape(x.shape[0], -1)
    for i in range(1, self.num_hidden_layers + 1):
      x = dense(self.hidden_features, use_bias=self.bias_before_bn or not self.use_bn,
                name=f"dense{i}")(x)
      if self.use_bn:
        x = norm(name=f"bn{i}")(x)
      x = nn.sigmoid(x)
    x = dense(self.num_classes, name=f"dense{self.num_hidden_layers + 1}")(x)
    return x.astype(jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": MnistCNN, "mlp": BNPaperMLP, **resnet.RESNETS}


def create_model(name: str, *, num_classes: int, use_bn: bool = True,
                 bias_before_bn: bool = True, bn_momentum: float = KERAS_BN_MOMENTUM,
                 bn_epsilon: float = KERAS_BN_EPSILON, zero_init_last_bn: bool = True,
                 norm: ModuleDef | None = None, conv: ModuleDef | None = None) -> nn.Module:
  """The linen module of model `name`.

  Args:
    name: a key of `MODELS`: 'cnn' (`MnistCNN`), 'mlp' (`BNPaperMLP`),
      'resnet20', 'resnet32', 'resnet56' (CIFAR-style), 'resnet18', 'resnet34',
      'resnet50' (ImageNet-style; `training.resnet`).
    num_classes: number of logits.
    use_bn: False removes batch norm ('cnn' and 'mlp' only).
    bias_before_bn: keep the conv/dense bias in front of each BN ('cnn' and
      'mlp' only; the ResNets have none).
    bn_momentum, bn_epsilon: of every BN layer.
    zero_init_last_bn: ResNets only: zero scale on the last BN of each
      residual branch.
    norm: the normalization module class; None: `jaxbn.linen.BatchNorm`.
    conv: 'cnn' only: its convolution module class; None: `ValidConv`
      (`LoopConv` for models stepped inside `lax.map` / `lax.scan`).

  Raises:
    ValueError: unknown `name`, a ResNet with `use_bn=False` or
      `bias_before_bn=True`, or `conv` for a model other than 'cnn'.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.")
  if conv is not None and name != "cnn":
    raise ValueError(f"conv is an attribute of model 'cnn' only, got it for {name!r}.")
  extra = {} if norm is None else {"norm": norm}
  if name in resnet.RESNETS:
    if not use_bn or bias_before_bn:
      raise ValueError(
          f"model {name!r} has batch norm after every convolution and no bias in "
          f"front of it; got use_bn={use_bn}, bias_before_bn={bias_before_bn} "
          "(set use_bn=True, bias_before_bn=False).")
    return resnet.RESNETS[name](num_classes=num_classes, bn_momentum=bn_momentum,
                                bn_epsilon=bn_epsilon,
                                zero_init_last_bn=zero_init_last_bn, **extra)
  if conv is not None:
    extra["conv"] = conv
  return MODELS[name](num_classes=num_classes, use_bn=use_bn, bias_before_bn=bias_before_bn,
                      bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, **extra)


# --- parameter table ----------------------------------------------------------

class TableRow(NamedTuple):
  """One row of `parameter_table`: the numbers held by one top-level submodule."""
  layer: str
  kind: str
  output_shape: tuple[int, ...]
  trainable: int
  non_trainable: int


def _size(tree) -> int:
  return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def parameter_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[TableRow]:
  """Per-layer output shapes and number counts, like Keras' `model.summary()`.

  One row per top-level submodule that runs (e.g. a conv, a BN, a residual
  block), in the order they run; parameter-free layers that are modules (the CNN's ReLU, pooling,
  flatten) have none. Trainable numbers are the `params` leaves; non-trainable
  ones the `batch_stats` leaves (BN running means and variances). Nothing is
  computed (`jax.eval_shape`).

  Args:
    model: a module called as `model(x, train=...)`.
    input_shape: `(height, width, channels)` of one example.
  """
  example = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  def run(key):
    variables = model.init(key, example, train=False)
    _, captured = model.apply(variables, example, train=False,
                              capture_intermediates=True, mutable=["intermediates"])
    return variables, captured["intermediates"]

  variables, intermediates = jax.eval_shape(run, jax.random.key(0))
  kinds = {path: type(module).__name__ for path, module in
           model.module_paths(jax.random.key(0), example, train=False).items()}
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
