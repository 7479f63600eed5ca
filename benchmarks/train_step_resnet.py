"""Training steps of ResNet-20 and ResNet-18 with jaxbn vs flax.linen.BatchNorm.

    python -m benchmarks.train_step_resnet            # ResNet-20 and ResNet-18
    python -m benchmarks.train_step_resnet --quick    # 3 repetitions
    python -m benchmarks.train_step_resnet --tiny     # smoke test: tiny ResNets

The models are `training/resnet.py`'s, the ones `train.py` trains: ResNet-20
(CIFAR-style, 32x32x3, batch 128) and ResNet-18 (ImageNet-style v1.5, 7x7/2
stem and max pool, 64x64x3 by default, batch 32). The only difference between
the variants of a model is its `norm` module: `jaxbn.linen.BatchNorm` (the
default), `flax.linen.BatchNorm` (same variables), or none (an identity, to
show what batch norm costs in the step). Each step is `jit(value_and_grad)` +
SGD with momentum (optax, learning rate 1e-3), parameters and batch
statistics updated; all variants of both models are timed round-robin in one
run.

Verdict rule: jaxbn is "not slower" on a model when its median wall time and
its median process CPU time per step are each at most 1.05x flax's.
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
from training import resnet  # noqa: E402

NOT_SLOWER_RATIO = 1.05


NORMS = {
    "jaxbn.linen.BatchNorm": jaxbn_linen.BatchNorm,
    "flax.linen.BatchNorm": nn.BatchNorm,
    "no normalization (reference)": resnet.Identity,
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

  (XLA:CPU takes ~15 s to compile flax's own `init` of a ResNet-18, most of it
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


def build_case(model, images, labels):
  """A zero-argument callable running one training step (state carried)."""
  variables = host_init(model, images)
  # A small learning rate keeps the no-normalization model finite, so all
  # variants time the same arithmetic on ordinary numbers.
  optimizer = optax.sgd(1e-3, momentum=0.9)
  carry = [variables["params"], variables.get("batch_stats", {}),
           optimizer.init(variables["params"])]
  step = make_step(model, optimizer)

  def run():
    params, batch_stats, opt_state, loss = step(*carry, images, labels)
    carry[:] = [params, batch_stats, opt_state]
    jax.block_until_ready(loss)
  return run


def model_specs(args) -> dict[str, dict]:
  """name -> the model factory (`norm -> module`), input and batch sizes."""
  if args.tiny:
    return {
        "ResNet-20 (tiny: 3 stages x 1 block, width 4)": dict(
            build=functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1),
                                    block_cls=resnet.BasicBlock, num_filters=4,
                                    stem="cifar", shortcut="pad", num_classes=10),
            image_size=8, batch=4, bn_layers=4),
        "ResNet-18 (tiny: 2 stages x 1 block, width 4)": dict(
            build=functools.partial(resnet.ResNet, stage_sizes=(1, 1),
                                    block_cls=resnet.BasicBlock, num_filters=4,
                                    num_classes=10),
            image_size=16, batch=4, bn_layers=6),
    }
  width = args.width or 64
  return {
      "ResNet-20": dict(build=functools.partial(resnet.ResNet20, num_classes=10),
                        image_size=32, batch=args.batch or 128, bn_layers=19),
      f"ResNet-18 width {width}": dict(
          build=functools.partial(resnet.ResNet18, num_classes=1000, num_filters=width),
          image_size=args.image_size or 64, batch=args.batch18 or 32, bn_layers=20),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="3 repetitions")
  size.add_argument("--tiny", action="store_true", help="smoke test: tiny ResNets")
  parser.add_argument("--width", type=int, help="ResNet-18 base width (default 64)")
  parser.add_argument("--batch", type=int, help="ResNet-20 batch size (default 128)")
  parser.add_argument("--batch18", type=int, help="ResNet-18 batch size (default 32)")
  parser.add_argument("--image-size", type=int, help="ResNet-18 input size (default 64)")
  parser.add_argument("--repeats", type=int, help="timed steps per variant")
  _harness.add_malloc_flag(parser)
  args = parser.parse_args(argv)
  _harness.configure_malloc(args.malloc)
  repeats = args.repeats or (2 if args.tiny else 3 if args.quick else 8)

  _harness.print_header("Training steps, ResNet-20 and ResNet-18 (random data)")
  specs = model_specs(args)
  cases = {}
  for model_name, spec in specs.items():
    shape = (spec["batch"], spec["image_size"], spec["image_size"], 3)
    images = jax.random.normal(jax.random.key(1), shape)
    labels = jax.random.randint(jax.random.key(2), (spec["batch"],), 0, 10)
    for norm_name, norm in NORMS.items():
      cases[(model_name, norm_name)] = build_case(spec["build"](norm=norm), images, labels)
  timings = _harness.time_interleaved(cases, repeats=repeats,
                                      warmup=1 if args.tiny else 2, cpu_time=True)
  verdicts = {}
  for model_name, spec in specs.items():
    by_norm = {norm: timings[(model_name, norm)] for norm in NORMS}
    ours, theirs = by_norm["jaxbn.linen.BatchNorm"], by_norm["flax.linen.BatchNorm"]
    no_norm = by_norm["no normalization (reference)"]
    rows = []
    for norm_name, timing in by_norm.items():
      cpu = float(np.median(timing.cpu_seconds))
      bn_cost = (f"{_harness.fmt_ms(timing.median - no_norm.median)} / "
                 f"{_harness.fmt_ms(cpu - float(np.median(no_norm.cpu_seconds)))}"
                 if timing is not no_norm else "-")
      rows.append([norm_name, timing.ms(), f"{spec['batch'] / timing.median:.1f}",
                   _harness.fmt_ratio(timing.median / ours.median), _harness.fmt_ms(cpu),
                   _harness.fmt_ratio(cpu / float(np.median(ours.cpu_seconds))),
                   bn_cost])
    wall_ratio = ours.median / theirs.median
    cpu_ratio = float(np.median(ours.cpu_seconds)) / float(np.median(theirs.cpu_seconds))
    not_slower = wall_ratio <= NOT_SLOWER_RATIO and cpu_ratio <= NOT_SLOWER_RATIO
    verdicts[model_name] = dict(wall_ratio=wall_ratio, cpu_ratio=cpu_ratio,
                                not_slower=not_slower)
    size = spec["image_size"]
    _harness.print_table(
        f"{model_name}, batch {spec['batch']}, {size}x{size}x3, f32, SGD+momentum "
        f"({repeats} interleaved steps per variant)",
        ["normalization", "step ms, median (min-max)", "examples/s", "time vs jaxbn",
         "CPU ms/step, median", "CPU vs jaxbn", "ms over no-norm, wall / CPU"], rows,
        f"{spec['bn_layers']} batch-norm layers. CPU ms: process CPU time per step (both "
        "XLA threads), steadier than wall time on a shared machine. 'ms over no-norm' = "
        "median minus the no-normalization model's median. jaxbn / flax: wall "
        f"{wall_ratio:.3f}x, CPU {cpu_ratio:.3f}x -> "
        f"{'not slower' if not_slower else 'SLOWER'} (rule: both <= "
        f"{NOT_SLOWER_RATIO}x).")
  return verdicts


if __name__ == "__main__":
  main()
