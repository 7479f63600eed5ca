"""Train-step memory of ResNet-50 with BN + ReLU vs jaxbn's memory-saving BN + activation.

    python -m benchmarks.activation_memory                       # H100 and TPU v5e
    python -m benchmarks.activation_memory --targets=tpu-v5e --variants=flax,jaxbn-inplace
    python -m benchmarks.activation_memory --fit                 # + largest batch on v5e
    python -m benchmarks.activation_memory --targets=tpu-v5e --batch=256   # one more point

Compiles (without a device: the compile-only GPU and TPU backends of
`jax[cuda12]` and `jax[tpu]`) one training step of a ResNet-50 v1.5, bf16
activations, float32 parameters, SGD with momentum, 128 images of 224x224 per
device, and prints per device what the compiler reports: temp memory (the
activations and workspace the step keeps), argument and output bytes, flops and
bytes accessed (TPU; XLA:GPU's compile-only cost analysis gives none).

The variants differ only in each BN + activation pair (the first two BNs of
every bottleneck block and the stem's):

* `flax`: `flax.linen.BatchNorm` then `nn.relu` (what flax's ImageNet example does);
* `jaxbn`: `jaxbn.linen.BatchNorm` then `nn.relu`;
* `jaxbn-inplace`: `jaxbn.linen.BatchNorm(activation="leaky_relu",
  memory_saving=True)`: the pair saves only its output for the backward pass
  (InPlace-ABN).
* `jaxbn-inplace-shortcut`: as `jaxbn-inplace`, and each block's last BN, the
  shortcut sum and the activation after it are one memory-saving layer too
  (`BatchNorm(...)(y, shortcut=shortcut)`): it keeps its output (the next
  block's input) and the shortcut (this block's input), not the BN's input.

Otherwise the BN before each residual sum and the projection shortcut's BN
carry no activation: they are `flax.linen.BatchNorm` in the `flax` variant and
`jaxbn.linen.BatchNorm` in the others. The compiled memory does not depend on
parameter values, so every variant keeps flax's zero initial scale on the last
BN of each block (which the memory-saving shortcut layer should not be trained
with: see docs/activation.md).

`--fit` estimates the largest per-device batch whose step fits a 16 GiB v5e
chip (arguments + temp + outputs - aliased <= 16 GiB) from compiles at
batches 128 and 256 (the step's memory is affine in the batch).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Other processes on this machine may hold libtpu too; compile-only use needs no lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from flax import linen as nn  # noqa: E402
import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxbn import linen as jaxbn_linen  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# Public device facts of an H100 SXM 80GB (XLA's GpuTargetConfigProto, text format).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

V5E_HBM_BYTES = 16 * 2**30
GIB = 2.0**30


def compile_only_device(target: str):
  if target == "h100":
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                            topology="1x1x1")
  elif target == "tpu-v5e":
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  else:
    raise ValueError(f"target must be 'h100' or 'tpu-v5e', got {target!r}.")
  return topology.devices[0]


class NormAct(nn.Module):
  """BN followed by ReLU (or the fused memory-saving jaxbn layer)."""
  variant: str
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    common = dict(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                  dtype=self.dtype)
    if self.variant == "flax":
      return nn.relu(nn.BatchNorm(**common)(x))
    if self.variant == "jaxbn":
      return nn.relu(jaxbn_linen.BatchNorm(**common)(x))
    if self.variant in ("jaxbn-inplace", "jaxbn-inplace-shortcut"):
      return jaxbn_linen.BatchNorm(activation="leaky_relu", memory_saving=True,
                                   **common)(x)
    raise ValueError(f"unknown variant {self.variant!r}")


class ResNet50(nn.Module):
  """ResNet-50 v1.5 (flax examples/imagenet), its norm + activation pairs swappable."""
  variant: str
  dtype: Any = jnp.bfloat16
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm_cls = nn.BatchNorm if self.variant == "flax" else jaxbn_linen.BatchNorm
    norm = functools.partial(norm_cls, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    norm_act = functools.partial(NormAct, self.variant, train, self.dtype)
    x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)])(x)
    x = norm_act()(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, num_blocks in enumerate((3, 4, 6, 3)):
      features = 64 * 2**stage
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        y = norm_act()(conv(features, (1, 1))(x))
        y = norm_act()(conv(features, (3, 3), (strides, strides))(y))
        y = conv(4 * features, (1, 1))(y)
        shortcut = x
        if x.shape != y.shape:
          shortcut = norm()(conv(4 * features, (1, 1), (strides, strides))(x))
        if self.variant == "jaxbn-inplace-shortcut":
          x = norm(scale_init=nn.initializers.zeros, activation="leaky_relu",
                   memory_saving=True)(y, shortcut=shortcut)
        else:
          x = nn.relu(shortcut + norm(scale_init=nn.initializers.zeros)(y))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def compile_train_step(variant: str, target: str, batch: int, image_size: int = 224):
  """Compiles one SGD step for `target`; returns the compiled executable."""
  device = compile_only_device(target)
  model = ResNet50(variant)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.bfloat16),
                         train=False))
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = jax.eval_shape(tx.init, variables["params"])

  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                    images, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      (variables["params"], variables["batch_stats"], opt_state, images,
                       labels))
  return jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*args).compile()


def measures(compiled) -> dict[str, float | None]:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      "temp_gib": memory.temp_size_in_bytes / GIB,
      "args_gib": memory.argument_size_in_bytes / GIB,
      "total_gib": total / GIB,
      "tflops": None if not cost else cost.get("flops", 0.0) / 1e12,
      "bytes_accessed_gib": None if not cost else cost.get("bytes accessed", 0.0) / GIB,
  }


def largest_fitting_batch(variant: str, hbm_bytes: int = V5E_HBM_BYTES,
                          batches: tuple[int, int] = (128, 256)) -> tuple[int, list[str]]:
  """Estimates the largest batch (a multiple of 8) whose v5e step fits `hbm_bytes`.

  The step's memory is affine in the batch (activations grow with it,
  parameters and optimizer state do not), so two compiles give the line; the
  estimate is where it crosses `hbm_bytes`. Returns the batch and the lines
  to print.
  """
  totals = [measures(compile_train_step(variant, "tpu-v5e", b))["total_gib"] * GIB
            for b in batches]
  per_image = (totals[1] - totals[0]) / (batches[1] - batches[0])
  fixed = totals[0] - per_image * batches[0]
  batch = int((hbm_bytes - fixed) // per_image) // 8 * 8
  lines = [f"  {variant}: batch {b}: {t / GIB:.2f} GiB" for b, t in zip(batches, totals)]
  lines.append(f"  {variant}: {per_image / 2**20:.1f} MiB per image + {fixed / GIB:.2f} GiB")
  return batch, lines


def proportional_batch_estimate(m: dict[str, float], batch: int,
                                hbm_bytes: int = V5E_HBM_BYTES) -> int:
  """Largest batch (multiple of 8) fitting `hbm_bytes` if temp memory grows in
  proportion to the batch and the rest stays (one compile; any fixed part of
  the temp memory makes this an underestimate; `--fit` uses two compiles)."""
  per_image = m["temp_gib"] * GIB / batch
  fixed = (m["total_gib"] - m["temp_gib"]) * GIB
  return int((hbm_bytes - fixed) // per_image) // 8 * 8


def _fmt(value):
  return "n/a" if value is None else f"{value:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--targets", default="h100,tpu-v5e")
  parser.add_argument("--variants",
                      default="flax,jaxbn,jaxbn-inplace,jaxbn-inplace-shortcut")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--fit", action="store_true",
                      help="also estimate the largest per-device batch on a 16 GiB v5e")
  args = parser.parse_args(argv)
  variants = args.variants.split(",")
  print(f"ResNet-50 v1.5 train step, bf16, {args.batch} images/device, per device:")
  print("| target | variant | temp GiB | args GiB | total GiB | TFLOP | bytes accessed GiB "
        "| batch fitting 16 GiB (est.) | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for target in args.targets.split(","):
    for variant in variants:
      start = time.perf_counter()
      m = measures(compile_train_step(variant, target, args.batch))
      seconds = time.perf_counter() - start
      fits = proportional_batch_estimate(m, args.batch) if target == "tpu-v5e" else None
      print(f"| {target} | {variant} | {m['temp_gib']:.2f} | {m['args_gib']:.2f} | "
            f"{m['total_gib']:.2f} | {_fmt(m['tflops'])} | {_fmt(m['bytes_accessed_gib'])} "
            f"| {'n/a' if fits is None else fits} | {seconds:.0f} |", flush=True)
  if args.fit:
    for variant in variants:
      batch, lines = largest_fitting_batch(variant)
      print("\n".join(lines))
      print(f"largest batch on a 16 GiB v5e (linear estimate), {variant}: {batch}",
            flush=True)


if __name__ == "__main__":
  main()
