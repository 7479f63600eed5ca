"""ResNets as flax.linen modules with `jaxbn.linen.BatchNorm`.

Two families, NHWC inputs, float32 parameters, activations in `dtype`:

* CIFAR-style (He et al. 2016, section 4.2): a 3x3 conv of 16 channels, three
  stages of `n` basic blocks with 16, 32 and 64 channels (stride 2 on the first
  conv of stages 2 and 3), global average pooling and a dense classifier:
  ResNet-20/32/56 (n = 3, 5, 9; 6n + 2 layers). The shortcut that changes
  shape is the paper's option A (subsample by 2 and pad the new channels with
  zeros: no parameters), so ResNet-20 has 0.27M parameters as in the paper.
  Any input size works (28x28x1 MNIST included).
* ImageNet-style (v1.5, as `examples/imagenet/models.py` of flax): a 7x7/2
  conv stem with a 3x3/2 max pool, four stages (64, 128, 256, 512 channels)
  of basic blocks (ResNet-18/34) or bottleneck blocks (ResNet-50, stride on
  the bottleneck's 3x3 conv), 1x1 projection shortcuts with BN, global average
  pooling and a dense classifier.

Every convolution is followed by batch normalization and has no bias (BN's
beta replaces it). `zero_init_last_bn` starts each residual branch's last BN
scale at zero (Goyal et al. 2017), so every block starts as the identity.

The normalization module is an argument: `norm=jaxbn.linen.BatchNorm` (the
default) or `flax.linen.BatchNorm` (same variables, for comparisons), called
with `use_running_average`, `momentum`, `epsilon`, `dtype`, `axis_name` and
`axis_index_groups`:

```python
from training import resnet
model = resnet.ResNet20(num_classes=10)
variables = model.init(jax.random.key(0), images, train=False)
logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
```

Under `jax.jit` over a batch-sharded array BN statistics are already global;
inside `jax.shard_map` set `axis_name` (and optionally `axis_index_groups`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from jaxbn import linen as jaxbn_linen

ModuleDef = Any

# He et al. (2015) initialization of convolution kernels, fan-out as in
# torchvision's ResNets.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Identity(nn.Module):
  """The identity in place of a normalization layer: `ResNet(norm=Identity)`.

  The no-normalization reference of the benchmarks; accepts the attributes
  `ResNet` passes to its `norm`.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  axis_name: Any = None
  axis_index_groups: Any = None
  scale_init: Any = None

  @nn.compact
  def __call__(self, x):
    return x


class BasicBlock(nn.Module):
  """Two 3x3 convs, each followed by BN; ReLU after the first and after the sum.

  Attributes:
    features: output channels.
    strides: stride of the first conv (and of the shortcut).
    conv: convolution module (`nn.Conv` partial without bias).
    norm: normalization module partial (BN).
    shortcut: 'projection' (1x1 conv + BN when the shape changes; ImageNet)
      or 'pad' (subsample and zero-pad the channels: the CIFAR paper's
      option A, no parameters).
    zero_init_last_bn: initialize the last BN's scale to zero.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "projection"
  zero_init_last_bn: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
    y = norm_relu(self.norm, y)
    y = self.conv(self.features, (3, 3))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    return nn.relu(_shortcut(self, x, y.shape, self.shortcut) + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided: v1.5), 1x1 expand by 4, each followed by BN.

  Attributes: as `BasicBlock` (`features` is the bottleneck width; the block
  outputs `4 * features` channels; the shortcut is a projection).
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = "projection"
  zero_init_last_bn: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (1, 1))(x)
    y = norm_relu(self.norm, y)
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = norm_relu(self.norm, y)
    y = self.conv(4 * self.features, (1, 1))(y)
    y = self.norm(scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    return nn.relu(_shortcut(self, x, y.shape, self.shortcut) + y)


def norm_relu(norm: ModuleDef, y: jax.Array, **kwargs) -> jax.Array:
  """`relu(norm(y))`; one layer when `norm` is `jaxbn.linen.BatchNorm` (a partial of it).

  jaxbn's layer with `activation="relu"` computes the same values; in
  programs compiled for GPUs it takes one closed-form backward pass through
  both, so that XLA:GPU does not write the masked gradient out between batch
  norm's two backward passes (fewer bytes per step; elsewhere it runs as the
  two layers: `jaxbn.batch_norm_activation`). Other norms get `nn.relu` after
  them.
  """
  module_class = norm.func if isinstance(norm, functools.partial) else norm
  if isinstance(module_class, type) and issubclass(module_class, jaxbn_linen.BatchNorm):
    return norm(activation="relu", **kwargs)(y)
  return nn.relu(norm(**kwargs)(y))


def _last_scale_init(zero: bool):
  return nn.initializers.zeros if zero else nn.initializers.ones


def _shortcut(block: nn.Module, x: jax.Array, shape: tuple[int, ...],
              kind: str) -> jax.Array:
  """The identity, or what maps `x` to the residual branch's `shape`."""
  if x.shape == shape:
    return x
  strides = (block.strides, block.strides)
  if kind == "projection":
    x = block.conv(shape[-1], (1, 1), strides, name="conv_proj")(x)
    return block.norm(name="norm_proj")(x)
  # Option A: the strided conv with SAME padding keeps ceil(size / stride)
  # rows and columns, which is what [::stride] keeps too.
  x = x[:, ::block.strides, ::block.strides, :]
  return jnp.pad(x, ((0, 0),) * 3 + ((0, shape[-1] - x.shape[-1]),))


class ResNet(nn.Module):
  """A ResNet; use the named partials (`ResNet20`, ..., `ResNet50`).

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_classes: number of logits.
    num_filters: channels of the stem and of the first stage (doubled per stage).
    stem: 'cifar' (3x3 conv, no pooling) or 'imagenet' (7x7/2 conv, 3x3/2 max pool).
    shortcut: 'pad' (option A) or 'projection', for shape-changing blocks.
    zero_init_last_bn: zero scale on each residual branch's last BN.
    dtype: activation dtype (bfloat16 for half precision); parameters and BN
      running statistics stay float32; logits are returned in float32.
    norm: normalization module class (`jaxbn.linen.BatchNorm` or
      `flax.linen.BatchNorm`).
    bn_momentum: BN running-average momentum (flax convention: weight of the
      old value).
    bn_epsilon: BN epsilon.
    axis_name: mapped axis name for cross-device BN statistics (inside
      `jax.shard_map`), or None.
    axis_index_groups: replica groups that pool BN statistics, or None.
    conv: convolution module class.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  stem: str = "imagenet"
  shortcut: str = "projection"
  zero_init_last_bn: bool = True
  dtype: Any = jnp.float32
  norm: ModuleDef = jaxbn_linen.BatchNorm
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Any = None
  axis_index_groups: Any = None
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = True) -> jax.Array:
    """Logits `(batch, num_classes)` float32 of images `(batch, H, W, C)`.

    Args:
      x: NHWC images.
      train: batch statistics (and updated `batch_stats`, which must be
        mutable) if True, else the running statistics.
    """
    if self.stem not in ("cifar", "imagenet"):
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
    if self.shortcut not in ("pad", "projection"):
      raise ValueError(
          f"shortcut must be 'pad' or 'projection', got {self.shortcut!r}.")
    x = jnp.asarray(x)
    if x.ndim != 4:
      raise ValueError(f"x must be NHWC images (batch, H, W, C), got shape {x.shape}.")
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=conv_kernel_init)
    norm = functools.partial(
        self.norm, use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups)
    if self.stem == "cifar":
      x = conv(self.num_filters, (3, 3), name="conv_init")(x)
      x = norm_relu(norm, x, name="bn_init")
    else:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name="conv_init")(x)
      x = norm_relu(norm, x, name="bn_init")
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = self.block_cls(
            self.num_filters * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
            conv=conv, norm=norm, shortcut=self.shortcut,
            zero_init_last_bn=self.zero_init_last_bn)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


_cifar = functools.partial(ResNet, block_cls=BasicBlock, num_filters=16, stem="cifar",
                           shortcut="pad")
ResNet20 = functools.partial(_cifar, stage_sizes=(3, 3, 3))
ResNet32 = functools.partial(_cifar, stage_sizes=(5, 5, 5))
ResNet56 = functools.partial(_cifar, stage_sizes=(9, 9, 9))
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)

# ResNet names of `training.models.create_model` (config.model).
RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet20": ResNet20, "resnet32": ResNet32, "resnet56": ResNet56,
    "resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50,
}
