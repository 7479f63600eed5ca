"""Batch norm and the ResNet-50 training step on whatever accelerator JAX sees.

    python -m benchmarks.accelerator            # GPU / TPU: < 8 minutes on one GPU
    python -m benchmarks.accelerator --tiny     # smoke test on CPU: tiny shapes, seconds

One command for whoever has a device (nothing pins it to the CPU; on a
machine without an accelerator it measures the CPU). On the first device of
`jax.devices()`, all interleaved round-robin (`benchmarks/_harness.py`):

1. One BN layer at every distinct shape of ResNet-50's 53 BN layers (12
   shapes at 224x224, per-device batch `--batch`, default 128), float32 and
   bfloat16: train-mode forward + backward (VJP w.r.t. input and parameters,
   `benchmarks/_impls.train_step`) and inference, jaxbn vs flax.linen vs the
   memory floor (8 passes over x for training, 2 for inference, at the
   bandwidth of a jitted `x * 2` timed in the same run, as
   `benchmarks/bn_op.py`), and PyTorch's `BatchNorm2d` (cuDNN, channels-last)
   when a CUDA build of torch sees a GPU. The last rows weigh each shape by the
   number of layers that have it: the BN time of one ResNet-50 step.
2. The ResNet-50 bf16 training step (`training.resnet.ResNet50`, SGD with
   momentum, `benchmarks/train_step_resnet.make_step`) with
   jaxbn.linen.BatchNorm vs flax.linen.BatchNorm vs no normalization
   (`benchmarks/train_step_resnet.NORMS`):
   images/s, the compiled program's memory (`memory_analysis()`) and the
   device's peak memory (`memory_stats()`, where the platform reports it).
"""

from __future__ import annotations

import argparse
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _harness
from benchmarks import _impls
from benchmarks import bn_op
from benchmarks import scaling
from benchmarks import train_step_resnet
from training import hlo
from training import resnet

DTYPES = ("f32", "bf16")


def device_name() -> str:
  device = jax.devices()[0]
  return f"{jax.device_count()} x {device.device_kind} ({device.platform})"


# --- 1. one BN layer ---------------------------------------------------------------

def _torch_cuda_case(x, ct):
  """PyTorch's BatchNorm2d on the GPU (cuDNN), channels-last, or None."""
  try:
    import torch
  except ImportError:
    return None
  if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    return None
  torch.backends.cudnn.benchmark = True
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(x.dtype)]

  def to_torch(a):
    t = torch.from_numpy(np.asarray(jnp.asarray(a, jnp.float32))).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last).to("cuda", dtype)

  module = torch.nn.BatchNorm2d(x.shape[-1], eps=_impls.EPSILON,
                                momentum=1.0 - _impls.MOMENTUM).cuda()
  tx, tct = to_torch(x).requires_grad_(True), to_torch(ct)

  def train():
    module.train()
    tx.grad = None
    module.zero_grad(set_to_none=True)
    module(tx).backward(tct)
    torch.cuda.synchronize()

  def infer():
    module.eval()
    with torch.no_grad():
      module(tx)
    torch.cuda.synchronize()

  return train, infer


def time_bn_shape(shape, dtype_name, repeats):
  """Times jaxbn, flax.linen, torch (CUDA) and the copy probe at one shape."""
  dtype = bn_op.DTYPES[dtype_name]
  key_x, key_ct = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, shape, jnp.float32).astype(dtype)
  ct = jax.random.normal(key_ct, shape, jnp.float32).astype(dtype)
  cases = {}
  for impl in _impls.jax_implementations(("jaxbn", "flax.linen")):
    params, state = impl.init(x)
    state = _impls.warm_state(impl, params, state, x)
    train = jax.jit(_impls.train_step(impl)).lower(params, state, x, ct).compile()
    infer = jax.jit(_impls.inference_step(impl)).lower(params, state, x).compile()
    cases[(impl.name, "train")] = (
        lambda c=train, a=(params, state, x, ct): jax.block_until_ready(c(*a)))
    cases[(impl.name, "infer")] = (
        lambda c=infer, a=(params, state, x): jax.block_until_ready(c(*a)))
  torch_case = None
  try:
    torch_case = _torch_cuda_case(x, ct)
  except (RuntimeError, TypeError) as error:  # a dtype or layout cuDNN lacks
    print(f"(torch {dtype_name} {shape} skipped: {error})")
  if torch_case is not None:
    cases[("torch BatchNorm2d (cuDNN)", "train")] = torch_case[0]
    cases[("torch BatchNorm2d (cuDNN)", "infer")] = torch_case[1]
  copy = jax.jit(lambda v: v * 2).lower(x).compile()
  cases[("copy", "copy")] = lambda: jax.block_until_ready(copy(x))
  timings = _harness.time_interleaved(cases, repeats=repeats)
  nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
  return timings, nbytes


def bn_rows(shapes: dict[tuple[int, ...], int], dtype_names: tuple[str, ...],
            repeats: int):
  """Table rows per shape and dtype, and the per-step totals weighed by layer count."""
  rows, totals = [], collections.defaultdict(float)
  for dtype_name in dtype_names:
    for shape, layers in shapes.items():
      timings, nbytes = time_bn_shape(shape, dtype_name, repeats)
      copy = timings.pop(("copy", "copy"))
      bandwidth = 2 * nbytes / copy.median
      floors = {"train": bn_op.TRAIN_PASSES * nbytes / bandwidth,
                "infer": bn_op.INFERENCE_PASSES * nbytes / bandwidth}
      for mode in ("train", "infer"):
        reference = timings[("jaxbn", mode)].median
        totals[(dtype_name, mode, "memory floor")] += layers * floors[mode]
        for (name, case_mode), timing in timings.items():
          if case_mode != mode:
            continue
          totals[(dtype_name, mode, name)] += layers * timing.median
          rows.append([bn_op.shape_text(shape), str(layers), dtype_name, mode, name,
                       timing.ms(), _harness.fmt_ratio(timing.median / reference),
                       _harness.fmt_ratio(timing.median / floors[mode]),
                       f"{bandwidth / 1e9:.1f}"])
  total_rows = []
  for (dtype_name, mode, name), seconds in totals.items():
    floor = totals[(dtype_name, mode, "memory floor")]
    reference = totals[(dtype_name, mode, "jaxbn")]
    total_rows.append([dtype_name, mode, name, _harness.fmt_ms(seconds),
                       _harness.fmt_ratio(seconds / reference),
                       _harness.fmt_ratio(seconds / floor)])
  return rows, total_rows


# --- 2. the ResNet-50 training step ----------------------------------------------------

def build_step(norm, images, labels, model_kwargs):
  """`(run, compiled)`: one bf16 SGD step of a ResNet with `norm` (state carried)."""
  model = resnet.ResNet(norm=norm, dtype=jnp.bfloat16, **model_kwargs)
  variables = train_step_resnet.host_init(model, images)
  optimizer = optax.sgd(1e-3, momentum=0.9)
  carry = [variables["params"], variables.get("batch_stats", {}),
           optimizer.init(variables["params"])]
  compiled = train_step_resnet.make_step(model, optimizer).lower(
      *carry, images, labels).compile()

  def run():
    params, batch_stats, opt_state, loss = compiled(*carry, images, labels)
    carry[:] = [params, batch_stats, opt_state]
    jax.block_until_ready(loss)
  return run, compiled


def resnet_rows(batch: int, image_size: int, repeats: int, model_kwargs: dict):
  images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
  labels = jax.random.randint(jax.random.key(2), (batch,), 0,
                              model_kwargs["num_classes"])
  cases, memory = {}, {}
  for name, norm in train_step_resnet.NORMS.items():
    cases[name], compiled = build_step(norm, images, labels, model_kwargs)
    analysis = compiled.memory_analysis()
    memory[name] = (None if analysis is None else
                    analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                    + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  timings = _harness.time_interleaved(cases, repeats=repeats, warmup=1)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  reference = timings["jaxbn.linen.BatchNorm"].median
  rows = []
  for name, timing in timings.items():
    rows.append([name, timing.ms(), f"{batch / timing.median:,.1f}",
                 _harness.fmt_ratio(reference / timing.median),
                 hlo.fmt_bytes(memory[name]) if memory[name] is not None else "n/a"])
  return rows, peak


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="smoke test: batch 2, 32x32 images, 2 BN shapes, a one-block "
                      "bottleneck ResNet of width 4")
  parser.add_argument("--dtypes", default=",".join(DTYPES),
                      help="BN layer dtypes, comma-separated (f32,bf16)")
  parser.add_argument("--batch", type=int, help="per-device batch (default 128)")
  parser.add_argument("--repeats", type=int, help="timed repetitions per case")
  parser.add_argument("--skip_resnet", action="store_true",
                      help="only the BN layer tables")
  args = parser.parse_args(argv)
  batch = args.batch or (2 if args.tiny else 128)
  image_size = 32 if args.tiny else scaling.IMAGE_SIZE
  repeats = args.repeats or (2 if args.tiny else 20)

  _harness.print_header(f"Batch norm and ResNet-50 on {device_name()}")
  layers = scaling.resnet50_shapes(image_size).bn_layers
  shapes = collections.Counter((batch,) + layer.shape for layer in layers)
  if args.tiny:
    shapes = collections.Counter(dict(list(shapes.items())[:2]))
  dtype_names = tuple(d for d in args.dtypes.split(",") if d)
  unknown = [d for d in dtype_names if d not in DTYPES]
  if unknown or not dtype_names:
    parser.error(f"--dtypes must be a comma-separated subset of {list(DTYPES)}, "
                 f"got {args.dtypes!r}")
  rows, total_rows = bn_rows(dict(shapes), dtype_names, repeats)
  _harness.print_table(
      f"One BN layer at ResNet-50's shapes on {device_name()} (batch {batch}, "
      f"{repeats} interleaved repetitions)",
      ["shape", "layers", "dtype", "mode", "implementation", "median ms (min-max)",
       "vs jaxbn", "x memory floor", "copy GB/s"], rows,
      f"Floor: {bn_op.TRAIN_PASSES} (train) or {bn_op.INFERENCE_PASSES} (inference) "
      "passes over x at the bandwidth of a jitted x * 2 measured at the same shape.")
  _harness.print_table(
      f"BN of one ResNet-50 step ({sum(shapes.values())} layers: each shape's median x "
      "its number of layers)",
      ["dtype", "mode", "implementation", "ms per step", "vs jaxbn", "x memory floor"],
      total_rows)
  if args.skip_resnet:
    return
  model_kwargs = (dict(stage_sizes=(1,), block_cls=resnet.BottleneckBlock, num_filters=4,
                       num_classes=10) if args.tiny else
                  dict(stage_sizes=(3, 4, 6, 3), block_cls=resnet.BottleneckBlock,
                       num_classes=1000))
  rows, peak = resnet_rows(batch, image_size, repeats, model_kwargs)
  peak_text = (f"Device peak memory of the whole run: {hlo.fmt_bytes(peak)} "
               "(`memory_stats()['peak_bytes_in_use']`)." if peak is not None else
               "This platform reports no device peak memory (`memory_stats()`).")
  name = "ResNet-50" if not args.tiny else "tiny bottleneck ResNet"
  _harness.print_table(
      f"{name} bf16 training step on {device_name()} (batch {batch}, "
      f"{image_size}x{image_size}x3, SGD + momentum, {repeats} interleaved steps)",
      ["normalization", "step ms, median (min-max)", "images/s", "speed vs jaxbn",
       "compiled memory (args + out + temp)"], rows, peak_text)


if __name__ == "__main__":
  main()
