"""ResNet-50 batch norm at scale, on paper: writes docs/scaling.md.

    python -m benchmarks.scaling                       # rewrites docs/scaling.md
    python -m benchmarks.scaling --output -            # prints it instead

Every number of the page comes from a formula below, evaluated on inputs that
are either measured by this script on the CPU it runs on or stated constants
with their source:

* the ResNet-50 BN layers (shape of each of the 53) from `jax.eval_shape` of
  `training.resnet.ResNet50` at 224x224, and its convolution FLOPs from the
  kernel and output shapes of the same trace;
* the bytes BN moves per training step on the GPU and TPU compilers, the
  kernels, all-reduces, memory and estimated step times: the stored output of
  `python -m benchmarks.compiled` (`COMPILED_RESULTS`, with the command that
  wrote it), which compiles ResNet-50's train step for H100s and a TPU v5e
  slice without a device;
* the all-reduces of one BN layer under `jax.shard_map` and their payload per
  channel, from the lowered StableHLO of one layer on 8 CPU devices
  (`training.lowering.collectives`);
* hardware: the HBM bandwidth and dense bf16 FLOP/s of an H100 SXM and a TPU
  v5e (vendor spec sheets), and an alpha-beta model of an all-reduce with the
  latency and bandwidth stated in `NETWORKS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from typing import NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "scaling.md"
# Written by `python -m benchmarks.compiled --json <this file> [--append]` (see its "commands").
COMPILED_RESULTS = REPO / "benchmarks" / "results" / "compiled_resnet50.json"

# The 8 devices of the collective measurement; must precede the first jax import
# (importing this module from another program changes nothing).
if __name__ == "__main__" and "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks import _impls  # noqa: E402

IMAGE_SIZE = 224
PER_DEVICE_BATCHES = (64, 128, 256)
DEVICE_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
BF16_BYTES = 2
# One BN layer measured at this shape (bf16), small enough to compile in a second.
PROBE_SHAPE = (16, 8, 8, 32)
# "Starts to cost": the BN all-reduces take more than this share of the step's
# compute time at peak FLOP/s.
COST_THRESHOLD = 0.05


class Accelerator(NamedTuple):
  name: str
  hbm_bytes_per_s: float
  bf16_flops_per_s: float
  source: str


ACCELERATORS = (
    Accelerator("H100 SXM", 3.35e12, 989e12,
                "NVIDIA H100 Tensor Core GPU datasheet: 3.35 TB/s HBM3, 989 TFLOP/s "
                "dense BF16 (1,979 with sparsity)"),
    Accelerator("TPU v5e", 819e9, 197e12,
                "Google Cloud TPU v5e documentation: 819 GB/s HBM2, 197 TFLOP/s BF16"),
)


class Link(NamedTuple):
  """One level of the network: up to `devices` devices, alpha-beta parameters."""
  devices: int
  alpha_s: float
  bytes_per_s: float


class Network(NamedTuple):
  """A hierarchical network for an accelerator: links from the innermost out.

  An all-reduce over p devices runs on each level over the devices it spans
  there (the first level over min(p, its size) devices, the next over
  ceil(p / that size) groups, ...), one after the other.
  """
  name: str
  accelerator: str
  links: tuple[Link, ...]
  note: str


NETWORKS = (
    Network("H100 SXM nodes of 8 GPUs on InfiniBand NDR", "H100 SXM",
            (Link(8, 2e-6, 450e9), Link(10**9, 5e-6, 50e9)),
            "NVLink 4 inside a node: 450 GB/s per direction per GPU (H100 datasheet: 900 "
            "GB/s), alpha 2 us (assumed); between nodes one 400 Gb/s NDR link per GPU: "
            "50 GB/s, alpha 5 us (assumed)"),
    Network("TPU v5e slice, ICI", "TPU v5e", (Link(256, 1e-6, 200e9),),
            "ICI 1,600 Gb/s per chip (Google Cloud TPU v5e documentation): 200 GB/s, "
            "alpha 1 us (assumed); a v5e slice has at most 256 chips, so its rows stop "
            "there"),
)


def _one_level_terms(nbytes: float, devices: int, link: Link) -> tuple[float, float]:
  """`(latency, bandwidth)` seconds of the faster of ring and tree on one link."""
  if devices <= 1:
    return 0.0, 0.0
  ring = (2 * (devices - 1) * link.alpha_s,
          2 * (devices - 1) / devices * nbytes / link.bytes_per_s)
  tree = (2 * math.log2(devices) * link.alpha_s, 2 * nbytes / link.bytes_per_s)
  return min(ring, tree, key=sum)


def all_reduce_terms(nbytes: float, devices: int, network: Network
                     ) -> tuple[float, float]:
  """`(latency, bandwidth)` seconds of an all-reduce of `nbytes` (see `Network`)."""
  latency = bandwidth = 0.0
  span = 1
  for link in network.links:
    level = min(math.ceil(devices / span), link.devices)
    terms = _one_level_terms(nbytes, level, link)
    latency, bandwidth = latency + terms[0], bandwidth + terms[1]
    span *= level
  return latency, bandwidth


def all_reduce_seconds(nbytes: float, devices: int, network: Network) -> float:
  return sum(all_reduce_terms(nbytes, devices, network))


def max_devices(network: Network) -> int:
  return math.prod(link.devices for link in network.links)


# --- the model -------------------------------------------------------------------

class Layer(NamedTuple):
  name: str
  shape: tuple[int, ...]  # per example (H, W, C)


class ResNetShapes(NamedTuple):
  bn_layers: tuple[Layer, ...]
  conv_flops_per_example: float  # forward, 2 * multiply-adds, convs and the dense layer
  num_parameters: int


def resnet50_shapes(image_size: int = IMAGE_SIZE) -> ResNetShapes:
  """BN layer shapes and forward FLOPs of `training.resnet.ResNet50` (eval_shape)."""
  from flax import linen as nn
  from jaxbn import linen as jaxbn_linen
  from training import resnet
  model = resnet.ResNet50(num_classes=1000)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

  def run(x, kinds):
    variables = model.init(jax.random.key(0), x, train=False)
    _, captured = model.apply(
        variables, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda module, _: isinstance(module, kinds))
    return variables["params"], captured["intermediates"]

  def outputs(kinds):
    params, captured = jax.eval_shape(lambda x: run(x, kinds), images)
    return params, [(jax.tree_util.keystr(path[:-2]), leaf.shape[1:])  # drop __call__, 0
                    for path, leaf in jax.tree_util.tree_flatten_with_path(captured)[0]]

  params, bn_outputs = outputs(jaxbn_linen.BatchNorm)
  _, linear_outputs = outputs((nn.Conv, nn.Dense))
  kernels = {jax.tree_util.keystr(path[:-1]): leaf.shape for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if jax.tree_util.keystr(path[-1:]) == "['kernel']"}
  layers = tuple(Layer(name, tuple(shape)) for name, shape in bn_outputs)
  # 2 x multiply-adds: each output element sums kh x kw x in (conv) or in (dense).
  flops = sum(2 * math.prod(shape) * math.prod(kernels[name][:-1])
              for name, shape in linear_outputs)
  num_parameters = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
  return ResNetShapes(layers, flops, num_parameters)


# --- one BN layer, measured -----------------------------------------------------------

class LayerCost(NamedTuple):
  """One BN layer's collectives in a training step (forward + backward)."""
  name: str
  all_reduces: int  # under shard_map, forward + backward
  all_reduce_bytes_per_channel: float  # payload per channel, summed over them


def measure_layer(impl_name: str) -> LayerCost:
  """Lowers one bf16 BN layer's training step on 8 CPU devices under shard_map."""
  from training import lowering
  (impl,) = _impls.jax_implementations((impl_name,))
  elements = math.prod(PROBE_SHAPE)
  x = jnp.linspace(-1.0, 1.0, elements).reshape(PROBE_SHAPE).astype(jnp.bfloat16)
  params, state = impl.init(x)
  state = _impls.warm_state(impl, params, state, x)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.ShapeDtypeStruct(PROBE_SHAPE, jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P("data")))
  step = jax.shard_map(_impls.train_step(impl, axis_name="data"), mesh=mesh,
                       in_specs=(P(), P(), P("data"), P("data")),
                       out_specs=(P("data"), P(), P(), P("data")), check_vma=False)
  text = jax.jit(step).lower(params, state, sharded, sharded).as_text(debug_info=True)
  found = [c for c in lowering.collectives(text) if c.op == "all_reduce"]
  channels = PROBE_SHAPE[-1]
  return LayerCost(impl.name, len(found), sum(c.nbytes for c in found) / channels)


def load_compiled(path: pathlib.Path = COMPILED_RESULTS) -> dict:
  """`{'commands': [...], 'rows': [...]}` as `benchmarks.compiled --json` wrote it."""
  return json.loads(pathlib.Path(path).read_text())


# --- the page -----------------------------------------------------------------------

def _ms(seconds: float) -> str:
  return _harness.fmt_ms(seconds)


def _mb(nbytes: float) -> str:
  return f"{nbytes / 1e6:,.1f}"


def _gb(nbytes: float) -> str:
  return f"{nbytes / 1e9:,.2f}"


def build_page(shapes: ResNetShapes, costs: dict[str, LayerCost], compiled: dict,
               command: str) -> str:
  jaxbn_cost, flax_cost = costs["jaxbn"], costs["flax.linen"]
  layers = shapes.bn_layers
  bn_elements = sum(math.prod(layer.shape) for layer in layers)  # per example
  channels = [layer.shape[-1] for layer in layers]
  train_flops = 3 * shapes.conv_flops_per_example  # forward + two backward products
  out = [
      "# ResNet-50 batch norm at scale, on paper",
      "",
      f"Generated by `{command}` (benchmarks/scaling.py); every number below is a "
      "formula of that script over the inputs it names. Nothing here ran on a GPU "
      "or TPU: the bytes and memory are the GPU and TPU compilers' (run without a "
      "device), the hardware numbers are spec-sheet constants and the network is an "
      "alpha-beta model with stated parameters.",
      "",
      "## Inputs",
      "",
      f"* ResNet-50 v1.5 (`training.resnet.ResNet50`, traced with `jax.eval_shape` at "
      f"{IMAGE_SIZE}x{IMAGE_SIZE}x3): {shapes.num_parameters:,} parameters, "
      f"{len(layers)} BN layers holding {bn_elements:,} activations per example "
      f"(sum of H x W x C over the layers), {sum(channels):,} BN channels, "
      f"{shapes.conv_flops_per_example / 1e9:.2f} GFLOP per example forward "
      "(2 x multiply-adds of the convolutions and the classifier), "
      f"{train_flops / 1e9:.2f} GFLOP per example for a training step (3 x forward: "
      "the forward product and the two backward products of each layer).",
  ]
  for cost in (jaxbn_cost, flax_cost):
    out.append(
        f"* {cost.name}, one bf16 BN layer at {PROBE_SHAPE}, training forward + backward "
        f"lowered under `jax.shard_map` on 8 CPU devices: {cost.all_reduces} "
        f"all-reduce(s) per layer and step carrying "
        f"{cost.all_reduce_bytes_per_channel:.0f} bytes per channel in total.")
  commands = ", ".join(f"`{c}`" for c in compiled["commands"])
  compiled_targets = ", ".join(dict.fromkeys(r["target"] for r in compiled["rows"]))
  out.append(
      f"* ResNet-50's train step compiled without a device by XLA:GPU and libtpu "
      f"({compiled_targets}): {commands} (benchmarks/compiled.py), stored in "
      f"`{COMPILED_RESULTS.relative_to(REPO)}`.")
  for accelerator in ACCELERATORS:
    out.append(f"* {accelerator.name}: {accelerator.source}.")
  for network in NETWORKS:
    out.append(f"* {network.name}: {network.note}.")
  out.append("* An all-reduce of n bytes over p devices of one link takes min(ring, "
             "tree): ring 2 (p - 1) alpha + 2 (p - 1) / p x n / bandwidth, tree "
             "2 log2(p) alpha + 2 n / bandwidth; across nodes it runs inside the node "
             "(over min(p, 8) GPUs), then between the ceil(p / 8) nodes.")
  out += [
      "",
      "## What BN costs in the compiled train step",
      "",
      "From `benchmarks.compiled` (per device and step, configs/resnet_imagenet.py's "
      "train step with the model's norm swapped). Bytes: TPU: the compiler's bytes "
      "accessed; GPU: operand + result bytes of the entry computation's kernels "
      "(`training.hlo.entry_bytes`). BN bytes = bytes minus the no-norm program's; "
      "floor: 3 passes over the BN layers' activations (read x for the statistics, "
      "x and dy for the backward sums). Step time and images/s are ESTIMATES from the "
      "compiler's counts: max(bytes / HBM bandwidth, flops / peak), not timings.",
      "",
  ]
  rows = []
  by_key = {(r["target"], r["parallelism"], r["dtype"], r["norm"]): r
            for r in compiled["rows"]}
  for row in compiled["rows"]:
    none = by_key.get((row["target"], row["parallelism"], row["dtype"], "none"))
    share = (row["bytes"] - none["bytes"]) if none and row["norm"] != "none" else None
    floor = 3 * row["bn_activation_bytes"]
    rows.append([
        row["target"], f"{row['model']} {row['dtype']} {row['parallelism']}",
        str(row["per_device_batch"]), row["norm"], _gb(row["bytes"]),
        _gb(share) if share is not None else "-",
        f"{share / floor:.2f}x" if share is not None else "-",
        str(row["kernels"]), str(row["all_reduces"]), _gb(row["temp_bytes"]),
        f"{row['est_step_s'] * 1e3:.1f}", f"{row['est_images_per_s']:,.0f}"])
  out.append(_harness.markdown_table(
      ["target", "step", "batch / device", "norm", "GB / step", "BN GB", "BN vs floor",
       "kernels", "all-reduces", "temp GB", "est. ms / step", "est. images/s"], rows))
  out += [
      "",
      "## Collectives per step, 8 to 1024 devices",
      "",
      f"Under `parallelism='shard_map'` each BN layer all-reduces its statistics in the "
      f"forward pass and its two gradient sums in the backward pass: "
      f"{jaxbn_cost.all_reduces} all-reduces per layer (jaxbn; flax.linen: "
      f"{flax_cost.all_reduces}), {len(layers) * jaxbn_cost.all_reduces} per step, "
      f"{_mb(jaxbn_cost.all_reduce_bytes_per_channel * sum(channels))} MB "
      f"in total ({jaxbn_cost.all_reduce_bytes_per_channel:.0f} bytes per channel x "
      f"{sum(channels):,} channels), the same at every batch size. They sit on the "
      "critical path: each layer waits for its own. The gradient all-reduce moves "
      f"{_mb(4 * shapes.num_parameters)} MB (float32 gradients of every parameter) "
      "once per step and overlaps with the backward pass (XLA combines its per-array "
      "all-reduces). Under `gspmd` the SPMD partitioner inserts the reductions when it "
      "compiles; this page models the shard_map program. Time per step from the "
      "alpha-beta model, one all-reduce per BN collective and one for the gradients; "
      "'MB sent / device' is a ring's 2 (p - 1) / p x payload, 'latency share' the "
      "alpha terms' part of the modelled time:",
      "",
  ]
  bn_messages = [jaxbn_cost.all_reduce_bytes_per_channel / jaxbn_cost.all_reduces * c
                 for c in channels for _ in range(jaxbn_cost.all_reduces)]
  grad_bytes = 4 * shapes.num_parameters
  group = 8

  def bn_seconds(devices, network):
    return sum(all_reduce_seconds(n, devices, network) for n in bn_messages)

  threshold_rows = []
  for network in NETWORKS:
    accelerator = next(a for a in ACCELERATORS if a.name == network.accelerator)
    counts = [d for d in DEVICE_COUNTS if d <= max_devices(network)]
    rows = []
    for devices in counts:
      bn_terms = [sum(t) for t in zip(*(all_reduce_terms(n, devices, network)
                                        for n in bn_messages))]
      grouped = bn_seconds(min(group, devices), network)
      grad_terms = all_reduce_terms(grad_bytes, devices, network)
      sent = 2 * (devices - 1) / devices  # bytes each device sends per byte reduced
      rows.append([str(devices), str(len(bn_messages)),
                   f"{sent * sum(bn_messages) / 1e6:.2f}", _ms(sum(bn_terms)),
                   f"{100 * bn_terms[0] / sum(bn_terms):.0f}%", _ms(grouped),
                   f"{sent * grad_bytes / 1e6:.1f}", _ms(sum(grad_terms)),
                   f"{100 * grad_terms[0] / sum(grad_terms):.0f}%"])
    out += [f"### {network.name}", "", _harness.markdown_table(
        ["devices", "BN all-reduces", "BN MB sent / device", "BN ms / step",
         "BN latency share", f"BN ms, bn_group_size={group}",
         "gradient MB sent / device", "gradient ms", "gradient latency share"],
        rows), ""]
    for batch in PER_DEVICE_BATCHES:
      compute = train_flops * batch / accelerator.bf16_flops_per_s
      first = next((d for d in counts if bn_seconds(d, network) > COST_THRESHOLD * compute),
                   None)
      grouped = bn_seconds(min(group, counts[-1]), network)
      threshold_rows.append([
          network.name, str(batch), _ms(compute),
          str(first) if first else f"> {counts[-1]} (never here)",
          f"{100 * bn_seconds(counts[-1], network) / compute:.0f}%",
          f"{100 * grouped / compute:.0f}%"])
  out += [
      "## Where BN synchronization starts to cost, and what `bn_group_size` buys",
      "",
      f"Rule: BN synchronization costs once its all-reduces take more than "
      f"{COST_THRESHOLD:.0%} of the step's compute time at peak FLOP/s; the first "
      "device count of the tables above where they do:",
      "",
      _harness.markdown_table(
          ["network", "batch / device", "compute ms at peak", "BN sync costs from",
           "BN / compute at the largest count", f"same with bn_group_size={group}"],
          threshold_rows),
      "",
      f"The BN payload is small ({jaxbn_cost.all_reduce_bytes_per_channel:.0f} bytes per "
      f"channel, at most {max(bn_messages) / 1e3:.1f} KB per all-reduce), "
      f"so its time is the latency term: {len(bn_messages)} all-reduces per step, one "
      "after the other (each layer needs its statistics before it can go on, so XLA "
      "cannot combine them as it combines the gradient's), each paying at least "
      "2 log2(p) alphas per level. That time grows with the device count and does not "
      "shrink with the batch, while the compute per device is fixed by the per-device "
      "batch: larger per-device batches push the threshold out. `bn_group_size=g` "
      "(shard_map) pools statistics over groups of g devices, here the 8 GPUs of an "
      "NVLink node, so the BN time stops growing at the group's size and never leaves "
      "the node. The price is statistics over g x batch examples instead of all of "
      "them, which large-batch ImageNet training uses on purpose (Goyal et al. 2017 "
      "normalize over 32 images per worker). The gradient all-reduce is "
      "bandwidth-bound, overlaps with the backward pass and is the same with either "
      f"BN. jaxbn sends {jaxbn_cost.all_reduces} all-reduces per layer of "
      f"{jaxbn_cost.all_reduce_bytes_per_channel:.0f} bytes per channel, flax.linen "
      f"{flax_cost.all_reduces} of {flax_cost.all_reduce_bytes_per_channel:.0f}"
      + (": the same network traffic."
         if (jaxbn_cost.all_reduces, jaxbn_cost.all_reduce_bytes_per_channel)
         == (flax_cost.all_reduces, flax_cost.all_reduce_bytes_per_channel) else "."),
      "",
  ]
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", default=str(OUTPUT),
                      help="markdown file to write, or - for stdout")
  args = parser.parse_args(argv)
  shapes = resnet50_shapes()
  costs = {name: measure_layer(name) for name in ("jaxbn", "flax.linen")}
  page = build_page(shapes, costs, load_compiled(), "python -m benchmarks.scaling")
  if args.output == "-":
    print(page)
  else:
    pathlib.Path(args.output).write_text(page + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
