"""Training step of a CIFAR-sized ResNet-18 with jaxbn vs flax.linen.BatchNorm.

    python -m benchmarks.train_step_resnet            # width 64, batch 128
    python -m benchmarks.train_step_resnet --quick    # 3 repetitions
    python -m benchmarks.train_step_resnet --tiny     # smoke test: width 4, batch 8

One model definition (flax.linen, NHWC): 3x3 stem, four stages of two basic
blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pooling and
a dense classifier, on random 32x32x3 images and labels. The only difference
between the variants is the normalization module: `flax.linen.BatchNorm`,
`jaxbn.linen.BatchNorm` (jaxbn's drop-in module, same variables), or none (an
identity, to show what the batch norms cost in the step). Each step is
`jit(value_and_grad)` + SGD with momentum (optax, learning rate 1e-3),
parameters and batch statistics updated; the variants are timed round-robin
in one run.
"""

from __future__ import annotations

import argparse
import functools
import os

if __name__ == "__main__":  # a CPU benchmark; importing it must not hide accelerators
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from flax import linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import _harness  # noqa: E402
from jaxbn import linen as jaxbn_linen  # noqa: E402

MOMENTUM = 0.9
EPSILON = 1e-5


class Identity(nn.Module):
  """Stands in for a normalization layer (the no-BN reference)."""
  use_running_average: bool | None = None

  @nn.compact
  def __call__(self, x):
    return x


class BasicBlock(nn.Module):
  features: int
  strides: int
  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(self.norm, use_running_average=not train)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant stem).

  `stages` and `blocks` shrink it for smoke tests only.
  """
  width: int = 64
  num_classes: int = 10
  norm: type = nn.BatchNorm
  stages: int = 4
  blocks: int = 2

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(self.norm(use_running_average=not train)(x))
    for stage, multiplier in enumerate((1, 2, 4, 8)[:self.stages]):
      for block in range(self.blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * multiplier, strides, self.norm)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


NORMS = {
    "jaxbn.linen.BatchNorm": functools.partial(jaxbn_linen.BatchNorm, momentum=MOMENTUM,
                                               epsilon=EPSILON),
    "flax.linen.BatchNorm": functools.partial(nn.BatchNorm, momentum=MOMENTUM,
                                              epsilon=EPSILON),
    "no normalization (reference)": Identity,
}


def make_step(model, optimizer):
  """A jitted SGD step: `(params, batch_stats, opt_state, images, labels) -> ...`."""
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates.get("batch_stats", batch_stats)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss
  return step


def host_init(model, images):
  """He-normal kernels, unit scales, zero biases, drawn with NumPy.

  (XLA:CPU takes ~15 s to compile flax's own `init` of this model, most of it
  for the threefry random number generator; the timing does not depend on how
  the weights were drawn.)
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), images[:1])
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)
    if "scale" in name or "'var'" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def build_case(norm, images, labels, **model_kwargs):
  """A zero-argument callable running one training step (state carried)."""
  model = ResNet18(norm=norm, **model_kwargs)
  variables = host_init(model, images)
  # A small learning rate keeps the no-normalization model finite (at 0.1 its
  # loss jumps to ~6e7 on step 2 and its ReLUs die), so all variants time the
  # same arithmetic on ordinary numbers.
  optimizer = optax.sgd(1e-3, momentum=0.9)
  carry = [variables["params"], variables.get("batch_stats", {}),
           optimizer.init(variables["params"])]
  step = make_step(model, optimizer)

  def run():
    params, batch_stats, opt_state, loss = step(*carry, images, labels)
    carry[:] = [params, batch_stats, opt_state]
    jax.block_until_ready(loss)
  return run


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="3 repetitions")
  size.add_argument("--tiny", action="store_true",
                    help="smoke test: width 4, batch 4, 8x8 images, 2 one-block stages")
  parser.add_argument("--width", type=int, help="base width (ResNet-18: 64)")
  parser.add_argument("--batch", type=int, help="batch size (default 128)")
  parser.add_argument("--repeats", type=int, help="timed steps per variant")
  _harness.add_malloc_flag(parser)
  args = parser.parse_args(argv)
  _harness.configure_malloc(args.malloc)
  width = args.width or (4 if args.tiny else 64)
  batch = args.batch or (4 if args.tiny else 128)
  repeats = args.repeats or (2 if args.tiny else 3 if args.quick else 8)
  image_size = 8 if args.tiny else 32
  shape = dict(stages=2, blocks=1) if args.tiny else dict(stages=4, blocks=2)

  _harness.print_header("Training step, ResNet-18 (CIFAR-sized, random data)")
  images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
  labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
  cases = {name: build_case(norm, images, labels, width=width, **shape)
           for name, norm in NORMS.items()}
  timings = _harness.time_interleaved(cases, repeats=repeats,
                                      warmup=1 if args.tiny else 2, cpu_time=True)
  reference = timings["jaxbn.linen.BatchNorm"]
  no_norm = timings["no normalization (reference)"]
  rows = []
  for name, timing in timings.items():
    cpu = float(np.median(timing.cpu_seconds))
    reference_cpu = float(np.median(reference.cpu_seconds))
    bn_cost = (f"{_harness.fmt_ms(timing.median - no_norm.median)} / "
               f"{_harness.fmt_ms(cpu - float(np.median(no_norm.cpu_seconds)))}"
               if name != "no normalization (reference)" else "-")
    rows.append([name, timing.ms(), f"{batch / timing.median:.1f}",
                 _harness.fmt_ratio(timing.median / reference.median),
                 _harness.fmt_ms(cpu), _harness.fmt_ratio(cpu / reference_cpu), bn_cost])
  name = ("ResNet-18" if shape == dict(stages=4, blocks=2) else
          f"ResNet ({shape['stages']} stages x {shape['blocks']} blocks)")
  _harness.print_table(
      f"{name} width {width}, batch {batch}, {image_size}x{image_size}x3, f32, "
      f"SGD+momentum ({repeats} interleaved steps per variant)",
      ["normalization", "step ms, median (min-max)", "examples/s", "time vs jaxbn",
       "CPU ms/step, median", "CPU vs jaxbn", "ms over no-norm, wall / CPU"], rows,
      "ResNet-18 has 20 batch-norm layers (stem, 16 in blocks, 3 on shortcuts). "
      "CPU ms: process CPU time per step (both XLA threads), steadier than wall time "
      "on a shared machine. 'ms over no-norm' = median minus the no-normalization "
      "model's median.")


if __name__ == "__main__":
  main()
