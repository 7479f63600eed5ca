"""Batch norm in ResNet train steps compiled for GPUs and TPUs, without a device.

    python -m benchmarks.compiled            # ResNet-50, bf16, gspmd: h100:2, tpu-v5e:2x2
    python -m benchmarks.compiled --models resnet20 --dtypes bf16,f32 \
        --parallelism gspmd,shard_map \
        --targets h100:2,a100:2,tpu-v5e:2x2,tpu-v4:2x2x1,tpu-v5p:2x2x1  # the small sweep
    python -m benchmarks.compiled --json runs/compiled.json   # also write the rows
    python -m benchmarks.compiled --blocks 56x64,28x128,14x256,7x512 --targets tpu-v5e:2x2

The train step of `configs/resnet_imagenet.py` (ResNet-50, 224x224) or
`configs/resnet_cifar.py` (ResNet-20, 32x32), as `train.py` builds it
(`training.lowering`), compiled by the real compiler of each target
(`training.targets`: XLA:GPU for H100 and A100 from their device descriptions,
libtpu for TPU topologies) with the model's norm swapped: `jaxbn.linen.BatchNorm`
(as shipped), `flax.linen.BatchNorm`, and none (an identity). Per target and
variant, per device per step:

* kernels: launched ops of the entry computation (`training.hlo.kernels`);
* bytes: TPU: the compiler's `cost_analysis()['bytes accessed']`; GPU (whose
  compiler reports none): the operand + result bytes of those kernels
  (`training.hlo.entry_bytes`), which ignores caches;
* HBM bytes (`training.hlo.hbm_traffic_bytes`; the second table, and `--blocks`): the
  kernels' operands and results that live in device memory plus each async
  copy once. The TPU compiler's "bytes accessed" also counts the kernels'
  reads and writes of on-chip VMEM and each VMEM prefetch or eviction four
  times (`tests/training/test_compiled.py` checks that account); on GPUs both
  are the kernels' operand + result bytes;
* BN: bytes minus the no-norm program's (BN's share), its ratio to flax's
  share, and to the floor: 3 passes over each BN layer's activations (one read
  of x for the statistics; x and dy read once for the backward sums; the
  normalization and dx fuse into the neighbouring elementwise passes);
* all-reduces and their bytes, and how many more than without norm per BN layer;
* temp and peak memory (`memory_analysis()`), flops (TPU: the compiler's; GPU:
  convolutions and matmuls of the traced step, `compiling.matmul_flops`), and
  a roofline ESTIMATE of the step time and images/s: max(bytes / HBM
  bandwidth, flops / peak) from public datasheet numbers (`training.targets.TARGETS`). Not a timing.

A ResNet-50 compile takes minutes per variant on a 2-core CPU (TPU: several);
select subsets with the flags. `--blocks` compiles, instead, the forward and
backward pass of `--num_blocks` of ResNet-50's bottleneck blocks (identity
shortcuts) at the named stage shapes (`<spatial>x<bottleneck width>`, e.g.
14x256: 14x14 activations of 256 and 1024 channels) on one device of each
target (seconds to a few minutes each): the bytes, BN's share, and, for TPUs,
the sum of the compiler's per-kernel cycle estimates (`estimated_cycles` in
each kernel's backend config), which weigh each kernel's traffic and compute
as the TPU compiler's own cost model sees them.
"""

from __future__ import annotations

import argparse
import importlib
import functools
import json
import os
import re
import time

if __name__ == "__main__":  # compile-only: no local accelerator is looked for
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from flax import linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import _harness  # noqa: E402
from jaxbn import linen as jaxbn_linen  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from training import hlo  # noqa: E402
from training import compiling  # noqa: E402
from training import lowering  # noqa: E402
from training import resnet  # noqa: E402
from training import targets  # noqa: E402

DEFAULT_TARGETS = "h100:2,tpu-v5e:2x2"
# Passes over a BN layer's activations that batch norm adds at least (see above).
FLOOR_PASSES = 3
CONFIGS = {"resnet50": "configs/resnet_imagenet.py", "resnet20": "configs/resnet_cifar.py"}


NORMS = {"jaxbn": jaxbn_linen.BatchNorm, "flax": nn.BatchNorm, "none": resnet.Identity}


def make_config(model: str, *, half_precision: bool, parallelism: str, num_devices: int,
                per_device_batch: int):
  """The model's shipped config for `num_devices` devices (no data is read)."""
  module = importlib.import_module(CONFIGS[model].removesuffix(".py").replace("/", "."))
  config = module.get_config()
  config.half_precision = half_precision
  config.parallelism = parallelism
  config.batch_size = config.eval_batch_size = per_device_batch * num_devices
  if model == "resnet50":
    # imagenet2012's metadata needs its prepared files: give the shapes instead.
    config.dataset, config.image_size, config.num_classes = "synthetic", 224, 1000
    config.num_train_examples = 1281167
  else:
    config.dataset, config.image_size, config.num_classes = "synthetic", 32, 10
    config.num_train_examples = 45000
  return config


def bn_activation_bytes(config, num_devices: int) -> tuple[int, int]:
  """`(layers, bytes)`: BN layers of the model and their inputs' bytes per device."""
  info = lowering.dataset_info(config)
  from training import train_state
  model = train_state.create_model(config, info)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  module = model.clone(dtype=dtype)
  per_device = config.batch_size // num_devices
  images = jax.ShapeDtypeStruct((per_device,) + info.image_shape, jnp.float32)

  def forward(images):
    variables = module.init(jax.random.key(0), images, train=False)
    _, state = module.apply(
        variables, images, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, jaxbn_linen.BatchNorm))
    return state["intermediates"]

  outputs = jax.tree.leaves(jax.eval_shape(forward, images))
  return len(outputs), sum(o.size * o.dtype.itemsize for o in outputs)


def measure(spec: targets.TargetSpec, model: str, dtype: str, parallelism: str,
            norms: list[str], per_device_batch: int) -> list[dict]:
  num_devices = len(targets.devices(spec))
  config = make_config(model, half_precision=dtype == "bf16", parallelism=parallelism,
                       num_devices=num_devices, per_device_batch=per_device_batch)
  layers, activation_bytes = bn_activation_bytes(config, num_devices)
  rows = []
  for norm in norms:
    start = time.perf_counter()
    (program,) = compiling.compile_config(config, spec, norm=NORMS[norm],
                                          programs=("train_step",))
    all_reduces = [c for c in program.collectives if c.op == "all-reduce"]
    rows.append({
        "target": spec.label, "model": model, "dtype": dtype, "parallelism": parallelism,
        "norm": norm, "per_device_batch": per_device_batch, "bn_layers": layers,
        "bn_activation_bytes": activation_bytes, "kernels": program.kernels,
        "bytes": program.nbytes, "bytes_method": program.bytes_method,
        "all_reduces": len(all_reduces),
        "all_reduce_bytes": sum(c.nbytes for c in all_reduces),
        "all_reduces_in_branches": sum(c.in_conditional for c in all_reduces),
        "entry_bytes": hlo.entry_bytes(program.hlo_text),
        "hbm_bytes": hlo.hbm_traffic_bytes(program.hlo_text),
        "async_copy_bytes": hlo.async_copy_bytes(program.hlo_text),
        "estimated_cycles": hlo.estimated_cycles(program.hlo_text),
        "convolutions": program.convolutions, "temp_bytes": program.temp_bytes,
        "peak_bytes": program.peak_bytes, "flops": program.flops,
        "est_step_s": program.roofline.step_s, "bound": program.roofline.bound,
        "est_images_per_s": program.images_per_s,
        "compile_s": time.perf_counter() - start})
    print(f"  compiled {spec.label} {model} {dtype} {parallelism} {norm} in "
          f"{rows[-1]['compile_s']:.0f} s", flush=True)
  return rows


def _bn_columns(row: dict, rows: list[dict]) -> list[str]:
  def same(norm):
    return next((r for r in rows if r["norm"] == norm and all(
        r[k] == row[k] for k in ("target", "model", "dtype", "parallelism"))), None)
  none, flax = same("none"), same("flax")
  if row["norm"] == "none" or none is None:
    return ["", "", "", ""]
  share = row["bytes"] - none["bytes"]
  floor = FLOOR_PASSES * row["bn_activation_bytes"]
  vs_flax = ""
  if flax is not None and row["norm"] != "flax":
    vs_flax = _harness.fmt_ratio(share / max(flax["bytes"] - none["bytes"], 1))
  extra = (row["all_reduces"] - none["all_reduces"]) / row["bn_layers"]
  return [hlo.fmt_bytes(share), vs_flax, _harness.fmt_ratio(share / floor), f"{extra:.2f}"]


def table(rows: list[dict]) -> str:
  headers = ["target", "model", "dtype", "parallelism", "norm", "kernels", "bytes / step",
             "BN bytes (over no norm)", "BN vs flax", "BN vs floor", "all-reduces (bytes)",
             "BN all-reduces per layer", "convolutions", "temp", "peak", "GFLOP",
             "est. ms / step", "est. images/s"]
  body = []
  for row in rows:
    bn = _bn_columns(row, rows)
    body.append([
        row["target"], row["model"], row["dtype"], row["parallelism"], row["norm"],
        row["kernels"], hlo.fmt_bytes(row["bytes"]), bn[0], bn[1], bn[2],
        f"{row['all_reduces']} ({hlo.fmt_bytes(row['all_reduce_bytes'])})", bn[3],
        row["convolutions"], hlo.fmt_bytes(row["temp_bytes"]),
        hlo.fmt_bytes(row["peak_bytes"]), f"{row['flops'] / 1e9:,.1f}",
        f"{row['est_step_s'] * 1e3:.3g} ({row['bound']})",
        f"{row['est_images_per_s']:,.0f}"])
  return _harness.markdown_table(headers, body)


class _Blocks(nn.Module):
  """`num_blocks` ResNet bottleneck blocks of width `features` (identity shortcuts)."""
  norm: type
  features: int
  num_blocks: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(self.norm, use_running_average=False, momentum=0.9,
                             dtype=self.dtype)
    for _ in range(self.num_blocks):
      x = resnet.BottleneckBlock(self.features, 1, conv=conv, norm=norm)(x)
    return x


def parse_block_stages(text: str) -> list[tuple[int, int]]:
  """`'56x64,14x256'` -> `[(56, 64), (14, 256)]` (spatial size, bottleneck width).

  Raises:
    ValueError: an item is not `<spatial>x<width>` with positive integers.
  """
  stages = []
  for item in text.split(","):
    match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
    if not match or not all(int(g) > 0 for g in match.groups()):
      raise ValueError(f"--blocks: expected items like '14x256' (spatial size x bottleneck "
                       f"width), got {item!r}.")
    stages.append((int(match.group(1)), int(match.group(2))))
  return stages


def measure_blocks(spec: targets.TargetSpec, size: int, features: int, dtype: str,
                   norms: list[str], per_device_batch: int, num_blocks: int) -> list[dict]:
  """Forward + backward of `num_blocks` bottleneck blocks on one device of `spec`."""
  device = targets.devices(spec)[0]
  mesh = jax.make_mesh((1,), ("data",), devices=[device],
                       axis_types=(jax.sharding.AxisType.Auto,))
  compute_dtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  shape = (per_device_batch, size, size, 4 * features)
  rows = []
  for norm in norms:
    net = _Blocks(NORMS[norm], features, num_blocks, compute_dtype)
    variables = jax.eval_shape(
        lambda net=net: net.init(jax.random.key(0), jnp.zeros((1,) + shape[1:], compute_dtype)))

    def step(variables, x, net=net):
      def loss(params):
        y, updates = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y.astype(jnp.float32))), updates
      (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
      return value, grads, updates

    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), variables)
    x = jax.ShapeDtypeStruct(shape, compute_dtype, sharding=NamedSharding(mesh, P("data")))
    start = time.perf_counter()
    compiled = jax.jit(step).lower(abstract, x).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
      cost = cost[0] if cost else {}
    nbytes = float(cost["bytes accessed"]) if "bytes accessed" in cost else float(
        hlo.entry_bytes(text))
    rows.append({
        "target": spec.label, "stage": f"{size}x{features}", "dtype": dtype, "norm": norm,
        "blocks": num_blocks, "per_device_batch": per_device_batch,
        "bn_activation_bytes": num_blocks * per_device_batch * size * size * 6 * features
                               * jnp.dtype(compute_dtype).itemsize,
        "kernels": len(hlo.kernels(text)), "bytes": nbytes,
        "bytes_method": ("compiler bytes accessed" if "bytes accessed" in cost
                         else compiling.ENTRY_BYTES_METHOD),
        "entry_bytes": hlo.entry_bytes(text), "hbm_bytes": hlo.hbm_traffic_bytes(text),
        "estimated_cycles": hlo.estimated_cycles(text),
        "async_copy_bytes": hlo.async_copy_bytes(text),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "compile_s": time.perf_counter() - start})
    print(f"  compiled {spec.label} blocks {size}x{features} {dtype} {norm} in "
          f"{rows[-1]['compile_s']:.0f} s", flush=True)
  return rows


def _fmt_optional(row: dict, key: str) -> str:
  """`row[key]` in bytes, or '' for rows written before the column existed."""
  return hlo.fmt_bytes(row[key]) if key in row else ""


def block_table(rows: list[dict]) -> str:
  """Per stage shape and norm: bytes and cycles, BN's share of them against flax's."""
  def share(row, key):
    none = next((r for r in rows if r["norm"] == "none" and all(
        r[k] == row[k] for k in ("target", "stage", "dtype"))), None)
    return None if none is None or key not in none else row[key] - none[key]

  def vs_flax(row, key):
    flax = next((r for r in rows if r["norm"] == "flax" and all(
        r[k] == row[k] for k in ("target", "stage", "dtype"))), None)
    if key not in row:
      return ""
    mine, theirs = share(row, key), flax and share(flax, key)
    if row["norm"] != "jaxbn" or mine is None or not theirs:
      return ""
    return _harness.fmt_ratio(mine / theirs)

  headers = ["target", "stage", "dtype", "norm", "kernels", "bytes", "BN bytes (over no norm)",
             "BN bytes vs flax", "HBM bytes", "BN HBM bytes vs flax",
             "entry kernels' operand + result bytes",
             "BN entry bytes vs flax", "async copies (TPU: VMEM prefetch / eviction)",
             "est. cycles (TPU)", "BN cycles vs flax", "temp"]
  body = []
  for row in rows:
    bn_bytes = share(row, "bytes")
    body.append([
        row["target"], row["stage"], row["dtype"], row["norm"], row["kernels"],
        hlo.fmt_bytes(row["bytes"]),
        "" if row["norm"] == "none" or bn_bytes is None else hlo.fmt_bytes(bn_bytes),
        vs_flax(row, "bytes"), _fmt_optional(row, "hbm_bytes"), vs_flax(row, "hbm_bytes"),
        hlo.fmt_bytes(row["entry_bytes"]), vs_flax(row, "entry_bytes"),
        hlo.fmt_bytes(row["async_copy_bytes"]),
        f"{row['estimated_cycles']:,}", vs_flax(row, "estimated_cycles"),
        hlo.fmt_bytes(row["temp_bytes"])])
  return _harness.markdown_table(headers, body)


def breakdown_table(rows: list[dict]) -> str:
  """Where each TPU program's bytes go: the kernels' own traffic and the async copies."""
  def share_vs_flax(row, key):
    def same(norm):
      return next((r for r in rows if r["norm"] == norm and all(
          r[k] == row[k] for k in ("target", "model", "dtype", "parallelism"))), None)
    none, flax = same("none"), same("flax")
    if row["norm"] != "jaxbn" or any(r is None or key not in r for r in (row, none, flax)):
      return ""
    theirs = flax[key] - none[key]
    return _harness.fmt_ratio((row[key] - none[key]) / theirs) if theirs else ""

  headers = ["target", "model", "dtype", "parallelism", "norm", "bytes",
             "HBM bytes", "BN HBM bytes vs flax",
             "entry kernels' operand + result bytes", "BN entry bytes vs flax",
             "async copies (TPU: VMEM prefetch / eviction)", "est. cycles (TPU)",
             "BN cycles vs flax"]
  body = [[row["target"], row["model"], row["dtype"], row["parallelism"], row["norm"],
           hlo.fmt_bytes(row["bytes"]), _fmt_optional(row, "hbm_bytes"),
           share_vs_flax(row, "hbm_bytes"), hlo.fmt_bytes(row["entry_bytes"]),
           share_vs_flax(row, "entry_bytes"), hlo.fmt_bytes(row["async_copy_bytes"]),
           f"{row['estimated_cycles']:,}", share_vs_flax(row, "estimated_cycles")]
          for row in rows if row.get("estimated_cycles")]  # TPU programs
  return _harness.markdown_table(headers, body)


_ROW_KEY = ("target", "model", "stage", "dtype", "parallelism", "norm")


def write_json(path: str, rows: list[dict], *, append: bool = False) -> None:
  """Writes `{'commands': [...], 'rows': rows}`, merged into `path`'s rows with `append`."""
  command = _harness.command_line()
  commands, kept = [command], []
  if append and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new_keys = {tuple(r.get(k) for k in _ROW_KEY) for r in rows}
    kept = [r for r in old["rows"] if tuple(r.get(k) for k in _ROW_KEY) not in new_keys]
    # A rerun command moves to the end: the list stays in the order the rows were written.
    commands = [c for c in old.get("commands", [old.get("command")])
                if c and c != command] + commands
  with open(path, "w") as f:
    json.dump({"commands": commands, "rows": kept + rows}, f, indent=1)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default=DEFAULT_TARGETS,
                      help="e.g. h100:2,a100:2,tpu-v5e:2x2,tpu-v4:2x2x1,tpu-v5p:2x2x1")
  parser.add_argument("--models", default="resnet50", help="resnet50, resnet20")
  parser.add_argument("--dtypes", default="bf16", help="bf16, f32")
  parser.add_argument("--parallelism", default="gspmd", help="gspmd, shard_map")
  parser.add_argument("--norms", default="jaxbn,flax,none", help="jaxbn, flax, none")
  parser.add_argument("--per_device_batch", type=int, default=128)
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  parser.add_argument("--blocks", default=None,
                      help="instead of whole models: bottleneck blocks at these stage shapes, "
                           "e.g. 56x64,28x128,14x256,7x512 (ResNet-50's four stages)")
  parser.add_argument("--num_blocks", type=int, default=2, help="blocks per --blocks stage")
  parser.add_argument("--append", action="store_true",
                      help="merge the rows into an existing --json file: a row of the same "
                           "target, model or stage, dtype, parallelism and norm is replaced, "
                           "the others kept, and this command is added to its 'commands'")
  parser.add_argument("--show", default=None,
                      help="print the tables of a --json file written earlier, compiling nothing")
  args = parser.parse_args(argv)
  if args.show:
    with open(args.show) as f:
      rows = json.load(f)["rows"]
    print(block_table(rows) if rows and "stage" in rows[0] else
          table(rows) + "\n\n" + breakdown_table(rows))
    return rows
  stages = parse_block_stages(args.blocks) if args.blocks else None
  targets.prepare_environment()
  if stages:
    _harness.print_header("Batch norm in ResNet bottleneck blocks compiled for GPUs and TPUs "
                          "(no device)")
    rows = []
    for spec in targets.parse(args.targets):
      for size, features in stages:
        for dtype in args.dtypes.split(","):
          rows += measure_blocks(spec, size, features, dtype, args.norms.split(","),
                                 args.per_device_batch, args.num_blocks)
    print()
    print(block_table(rows))
    print("\nBytes: TPU: the compiler's bytes accessed; GPU: "
          f"{compiling.ENTRY_BYTES_METHOD}. Est. cycles: the sum of the TPU compiler's "
          "per-kernel estimated_cycles. Compiler counts, not timings.")
    if args.json:
      write_json(args.json, rows, append=args.append)
    return rows
  _harness.print_header("Batch norm in compiled train steps (GPU and TPU compilers, "
                        "no device)")
  rows = []
  for spec in targets.parse(args.targets):
    for model in args.models.split(","):
      for dtype in args.dtypes.split(","):
        for parallelism in args.parallelism.split(","):
          rows += measure(spec, model, dtype, parallelism, args.norms.split(","),
                          args.per_device_batch)
  print()
  print(table(rows))
  print()
  print(breakdown_table(rows))
  print(f"\nBytes: TPU: the compiler's bytes accessed; GPU: {compiling.ENTRY_BYTES_METHOD}. "
        f"Floor: {FLOOR_PASSES} passes over the BN layers' activations. Step time and "
        "images/s: roofline estimates (max of bytes / HBM bandwidth, flops / peak), not "
        "timings.")
  if args.json:
    write_json(args.json, rows, append=args.append)
  return rows


if __name__ == "__main__":
  main()
