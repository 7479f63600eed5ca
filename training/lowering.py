"""Lowers the training program for GPUs and TPUs on any machine: `train.py --lower_for`.

`lower_for_platforms(config, workdir, platforms)` builds everything as
`train_lib.train_and_evaluate` does (model, optimizer, the `('data',)` mesh over
the visible devices, shardings, `parallelism`, `half_precision`), but from
abstract shapes only (`jax.ShapeDtypeStruct` with the mesh's shardings: no
parameters are initialized and no data is read), and exports the jitted train
step and eval step with `jax.export` for each platform. Nothing is compiled or
run, so a laptop's CPU lowers for `cuda` and `tpu` and shows what the program
holds before a job is queued:

```
XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python train.py --config=configs/mnist_bn.py --lower_for=cuda,tpu --workdir=/tmp/w
```

For each platform and program it writes, under `<workdir>/lowered/<platform>/`:

* `<program>.jax_exported`: `jax.export.Exported.serialize()`; load it with
  `deserialize_exported` (it registers the NamedTuple types of the state) and
  call `.call(state, batch)` on `nr_devices` devices of that platform;
* `<program>.stablehlo.mlir`: the StableHLO text (`Exported.mlir_module()`).

The exported programs record the mesh's device count (`Exported.nr_devices`)
and shardings: a program lowered over 8 devices runs on 8. To lower for a
bigger job on a CPU, make that many virtual CPU devices with `XLA_FLAGS` as
above.

Collectives: under `parallelism='shard_map'` the step's collectives are
explicit in the StableHLO and are reported per step by kind and purpose
(batch-norm statistics in the forward and backward pass vs the rest of the
step: the gradient mean, loss and metrics), with the bytes each device sends
into them. Under `'gspmd'` the StableHLO holds sharding annotations only: XLA's
SPMD partitioner inserts the collectives when it compiles for the target.
"""

from __future__ import annotations

import collections
import functools
import math
import pathlib
import re
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from training import datasets
from training import distributed
from training import evaluation
from training import hlo
from training import input_pipeline
from training import optimizers
from training import prepare
from training import run_config
from training import steps as steps_lib
from training import train_state

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
LOWERED_DIR = "lowered"
PROGRAMS = ("train_step", "eval_step")
# StableHLO spells the compiled programs' collective ops with underscores.
COLLECTIVE_OPS = tuple(op.replace("-", "_") for op in hlo.COLLECTIVE_OPS)
# Source files whose collectives are batch-norm statistics (jaxbn, flax's BN).
_BN_SOURCES = ("jaxbn/", "flax/linen/normalization.py", "flax/nnx/nn/normalization.py")
# Custom-call targets that call back into Python on the host
# (jax.pure_callback, io_callback, jax.debug.print).
_HOST_CALLBACK = re.compile(r"callback", re.IGNORECASE)


class Collective(NamedTuple):
  """One collective op of a lowered program.

  Attributes:
    op: StableHLO op name without the dialect, e.g. 'all_reduce'.
    purpose: 'batch norm forward', 'batch norm backward' (the statistics'
      all-reduces of the BN layers, traced from jaxbn's or flax's BN source)
      or 'gradients, loss, metrics' (anything else: the step's means and sums).
    nbytes: bytes of its operands on one device.
  """
  op: str
  purpose: str
  nbytes: int


class LoweredProgram(NamedTuple):
  """One program exported for one platform.

  Attributes:
    name: 'train_step' or 'eval_step'.
    platform: 'cpu', 'cuda', 'rocm' or 'tpu'.
    exported: the `jax.export.Exported`.
    stablehlo: its StableHLO text.
    collectives: its collective ops, in program order.
    paths: the files written (serialized module, StableHLO text).
  """
  name: str
  platform: str
  exported: jax.export.Exported
  stablehlo: str
  collectives: tuple[Collective, ...]
  paths: tuple[pathlib.Path, ...]


class Lowering(NamedTuple):
  """What `lower_for_platforms` built and exported.

  Attributes:
    programs: every (program, platform) pair.
    num_parameters: trainable numbers of the model.
    parameter_bytes: bytes of the parameters.
    state_bytes: bytes of the whole train state (parameters, optimizer state,
      BN running statistics, counters), replicated on every device.
    num_devices: devices of the mesh (`Exported.nr_devices`).
    summary: the text printed by `train.py --lower_for`.
  """
  programs: tuple[LoweredProgram, ...]
  num_parameters: int
  parameter_bytes: int
  state_bytes: int
  num_devices: int
  summary: str


def parse_platforms(text: str | Iterable[str]) -> tuple[str, ...]:
  """`'cuda,tpu'` -> `('cuda', 'tpu')`, checked against `PLATFORMS`.

  Raises:
    ValueError: an empty list, an unknown or a repeated platform.
  """
  names = ([p.strip() for p in text.split(",")] if isinstance(text, str)
           else [str(p).strip() for p in text])
  names = [p.lower() for p in names if p]
  unknown = [p for p in names if p not in PLATFORMS]
  if not names or unknown or len(set(names)) != len(names):
    raise ValueError(f"lower_for must be a comma-separated list of distinct platforms "
                     f"from {list(PLATFORMS)}, got {text!r}.")
  return tuple(names)


# --- building the program from abstract values --------------------------------

def dataset_info(config: ml_collections.ConfigDict) -> datasets.DatasetInfo:
  """The model input's shape and classes for `config`, without reading any data.

  From the config's `image_size` / `num_classes` when set (and present), else
  from tfds' metadata of `config.dataset` (`datasets.dataset_info`).
  """
  return datasets.dataset_info(config.dataset, data_dir=config.data_dir or None,
                               image_size=config.get("image_size", 0),
                               num_classes=config.get("num_classes", 0))


def _num_train_examples(config: ml_collections.ConfigDict) -> int:
  """Training examples per epoch, for the learning-rate schedule's length.

  The schedule's length only changes constants of the program; when neither
  the config nor tfds' metadata (of a prepared dataset) gives it, one global
  batch per epoch is assumed.
  """
  if config.num_train_examples:
    return config.num_train_examples
  try:
    train_split = run_config.split_names(config)[0]
    builder = prepare.tfds_builder(config.dataset, config.data_dir or None, tensorflow=False)
    return builder.info.splits[train_split].num_examples
  except (KeyError, ValueError):
    return config.batch_size


def _abstract(tree, sharding):
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), tree)


def abstract_batch(global_batch_size: int, image_shape: tuple[int, ...],
                   sharding: jax.sharding.Sharding) -> input_pipeline.Batch:
  """A global `Batch` of shapes only (uint8 images), sharded like the training batches."""
  def spec(shape, dtype):
    return jax.ShapeDtypeStruct((global_batch_size,) + tuple(shape), dtype,
                                sharding=sharding)
  return input_pipeline.Batch(images=spec(image_shape, jnp.uint8),
                              labels=spec((), jnp.int32), mask=spec((), jnp.bool_))


def _nbytes(tree) -> int:
  return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


# --- serialization ------------------------------------------------------------

def _node_types(treedef, found: set) -> set:
  data = treedef.node_data()
  if data is not None:
    found.add(data[0])
  for child in treedef.children():
    _node_types(child, found)
  return found


_REGISTERED: set[type] = set()


def register_serialization(tree) -> None:
  """Registers the NamedTuple node types of `tree` with `jax.export`.

  `Exported.serialize()` and `jax.export.deserialize` need every custom
  pytree node of the inputs and outputs registered (the train state holds
  `TrainState`, `jaxbn.BatchNormState`, optax's states...). Each NamedTuple is
  registered under its `module.QualifiedName`.

  Raises:
    ValueError: a custom pytree node that is not a NamedTuple.
  """
  builtin = (tuple, list, dict, collections.OrderedDict, type(None))
  for node_type in _node_types(jax.tree.structure(tree), set()):
    if node_type in builtin or node_type in _REGISTERED:
      continue
    if not (issubclass(node_type, tuple) and hasattr(node_type, "_fields")):
      raise ValueError(f"cannot serialize pytree node type {node_type}: only "
                       "NamedTuples, tuples, lists and dicts are supported.")
    try:
      jax.export.register_namedtuple_serialization(
          node_type, serialized_name=f"{node_type.__module__}.{node_type.__qualname__}")
    except ValueError:  # registered elsewhere already: that registration serves
      pass
    _REGISTERED.add(node_type)


def deserialize_exported(path: str | pathlib.Path, config: ml_collections.ConfigDict
                         ) -> jax.export.Exported:
  """Loads a `<program>.jax_exported` written for `config`.

  The config rebuilds the abstract train state to register its pytree node
  types for deserialization (nothing else of it is used).
  """
  programs = build_programs(config)
  register_serialization((programs.state, programs.train_batch))
  return jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))


# --- what the lowered program holds -------------------------------------------

_TENSOR = re.compile(r"tensor<([^>]*)>")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i16": 2,
                "i8": 1, "i1": 1, "ui32": 4, "ui8": 1}


def tensor_bytes(type_text: str) -> int:
  """Bytes of a StableHLO tensor type body, e.g. `'2x64xf32'` -> 512."""
  *dims, dtype = type_text.split("x")
  return math.prod(int(d) for d in dims) * _DTYPE_BYTES[dtype]


def _location_names(text: str) -> dict[str, str]:
  """`#locN` alias -> every string reachable from its definition, joined."""
  definitions = dict(re.findall(r"^(#loc\d+) = (.*)$", text, re.M))
  resolved: dict[str, str] = {}

  def resolve(alias, depth=0):
    if alias not in resolved:
      body = definitions.get(alias, "")
      parts = re.findall(r'"([^"]*)"', body)
      if depth < 50:
        parts += [resolve(ref, depth + 1) for ref in re.findall(r"#loc\d+", body)]
      resolved[alias] = " ".join(parts)
    return resolved[alias]

  return {alias: resolve(alias) for alias in definitions}


def collectives(stablehlo: str) -> tuple[Collective, ...]:
  """The collective ops of a StableHLO module's text, in program order.

  An op's purpose comes from its source location (which the text carries):
  an all-reduce traced from jaxbn's or flax's BN code is a batch-norm
  statistics reduction (its name stack says `transpose(...)` in the backward
  pass).
  """
  names = _location_names(stablehlo)
  lines = stablehlo.splitlines()
  found = []
  pattern = re.compile(r'"?stablehlo\.(' + "|".join(COLLECTIVE_OPS) + r')"?\(')
  for i, line in enumerate(lines):
    match = pattern.search(line)
    if not match:
      continue
    # The op's type signature and location close its (possibly multi-line) text.
    j = i
    while j < len(lines) and not re.search(r"\)\s*->\s*.*loc\(", lines[j]):
      j += 1
    signature = lines[j] if j < len(lines) else line
    operands = signature.split("->")[0]
    nbytes = sum(tensor_bytes(t) for t in _TENSOR.findall(operands))
    loc = re.search(r"loc\((#loc\d+)\)\s*$", signature)
    where = names.get(loc.group(1), "") if loc else ""
    if any(source in where for source in _BN_SOURCES):
      purpose = ("batch norm backward" if "transpose(" in where
                 else "batch norm forward")
    else:
      purpose = "gradients, loss, metrics"
    found.append(Collective(match.group(1), purpose, nbytes))
  return tuple(found)


def convolution_dtypes(stablehlo: str) -> collections.Counter:
  """Element types of the inputs of every `stablehlo.convolution`."""
  counts = collections.Counter()
  for line in stablehlo.splitlines():
    if "stablehlo.convolution" in line:
      operands = line.rsplit(":", 1)[-1].split("->")[0]
      types = _TENSOR.findall(operands)
      counts[types[0].split("x")[-1] if types else "?"] += 1
  return counts


def host_callbacks(stablehlo: str) -> list[str]:
  """Custom-call targets that call back into Python on the host."""
  targets = re.findall(r"custom_call\s*@([\w.]+)", stablehlo)
  targets += re.findall(r'call_target_name\s*=\s*"([^"]+)"', stablehlo)
  return sorted({t for t in targets if _HOST_CALLBACK.search(t)})


def format_collectives(found: Iterable[Collective]) -> str:
  """`'53 all_reduce batch norm forward (X KB), ...'` grouped by purpose and op."""
  groups: dict[tuple[str, str], list[int]] = {}
  for c in found:
    groups.setdefault((c.purpose, c.op), []).append(c.nbytes)
  if not groups:
    return "none"
  return "; ".join(f"{len(sizes)} {op} for {purpose} ({hlo.fmt_bytes(sum(sizes))})"
                   for (purpose, op), sizes in groups.items())


# --- the driver -----------------------------------------------------------------

class Programs(NamedTuple):
  """The jitted steps of a config with abstract arguments to export them with."""
  info: datasets.DatasetInfo
  num_devices: int
  state: train_state.TrainState  # of jax.ShapeDtypeStruct, replicated
  train_batch: input_pipeline.Batch  # of jax.ShapeDtypeStruct, batch-sharded
  steps: dict[str, tuple[Any, tuple]]  # name -> (jitted step, its arguments)


def build_programs(config: ml_collections.ConfigDict, devices: list | None = None,
                   norm: Any = None) -> Programs:
  """What `train_lib.train_and_evaluate` builds, from shapes only.

  Args:
    config: the run's config.
    devices: the mesh's devices; None: `distributed.create_mesh` over this
      machine's (`config.num_devices`).
    norm: a linen normalization module class replacing the model's
      `jaxbn.linen.BatchNorm` (benchmarks compare flax's and none).
  """
  mesh = (distributed.create_mesh(config.num_devices) if devices is None
          else distributed.create_mesh(devices=devices))
  run_config.validate_config(config, mesh.devices.size)
  info = dataset_info(config)
  model = train_state.create_model(config, info)
  if norm is not None:
    model = model.clone(norm=norm)
  steps_per_epoch = input_pipeline.steps_per_epoch(_num_train_examples(config),
                                                   config.batch_size)
  tx = optimizers.create_optimizer(config, max(steps_per_epoch, 1))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(distributed.AXIS))
  state = _abstract(jax.eval_shape(functools.partial(
      train_state.create_train_state, model, tx, input_shape=info.image_shape),
      jax.random.key(0)), replicated)
  train_batch = abstract_batch(config.batch_size, info.image_shape, batch_sharding)
  eval_batch = abstract_batch(
      evaluation.eval_batch_rows(config.eval_batch_size, mesh.devices.size),
      info.image_shape, batch_sharding)
  steps = {
      "train_step": (steps_lib.make_train_step(config, mesh, model, tx),
                     (state, train_batch)),
      "eval_step": (steps_lib.make_eval_step(config, mesh, model),
                    (state.params, state.bn_state,
                     _abstract(jax.eval_shape(train_state.zero_eval_sums), replicated),
                     eval_batch)),
  }
  return Programs(info, mesh.devices.size, state, train_batch, steps)


def lower_for_platforms(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path | None,
                        platforms: str | Iterable[str]) -> Lowering:
  """Exports the train and eval steps of `config` for each of `platforms`.

  Args:
    config: a training config (as for `train_lib.train_and_evaluate`).
    workdir: the files go to `<workdir>/lowered/<platform>/` (process 0
      only); None writes nothing.
    platforms: e.g. `'cuda,tpu'` or `('cuda', 'tpu')`; see `PLATFORMS`.

  Returns:
    The exported programs and the summary text.

  Raises:
    ValueError: a bad config or platform list.
  """
  platforms = parse_platforms(platforms)
  built = build_programs(config)
  register_serialization((built.state, built.train_batch))
  write = workdir is not None and jax.process_index() == 0
  programs = []
  for platform in platforms:
    directory = pathlib.Path(workdir or ".").expanduser() / LOWERED_DIR / platform
    for name, (step, args) in built.steps.items():
      exported = jax.export.export(step, platforms=[platform])(*args)
      register_serialization(exported.out_tree.unflatten(exported.out_avals))
      stablehlo = exported.mlir_module()
      paths = ()
      if write:
        directory.mkdir(parents=True, exist_ok=True)
        paths = (directory / f"{name}.jax_exported", directory / f"{name}.stablehlo.mlir")
        paths[0].write_bytes(exported.serialize())
        paths[1].write_text(stablehlo)
      programs.append(LoweredProgram(name, platform, exported, stablehlo,
                                     collectives(stablehlo), paths))
  params = built.state.params
  result = Lowering(tuple(programs),
                    sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)),
                    _nbytes(params), _nbytes(built.state), built.num_devices, "")
  return result._replace(summary=_summary(config, built.info, built.train_batch, result))


def _summary(config, info, train_batch, result: Lowering) -> str:
  dtype = "bfloat16" if config.half_precision else "float32"
  per_device = config.batch_size // result.num_devices
  lines = [
      f"Lowered {config.model} on {info.name} {info.image_shape} for "
      f"{', '.join(dict.fromkeys(p.platform for p in result.programs))}: "
      f"{result.num_devices} device(s), parallelism={config.parallelism}, "
      f"{dtype} activations, global batch {config.batch_size} "
      f"({per_device} per device).",
      f"Parameters: {result.num_parameters:,} ({hlo.fmt_bytes(result.parameter_bytes)}); "
      f"train state {hlo.fmt_bytes(result.state_bytes)} per device (replicated); "
      f"train batch {hlo.fmt_bytes(_nbytes(train_batch) / result.num_devices)} per device.",
      "Collectives per step (bytes each device contributes), convolutions (input dtype):",
  ]
  for program in result.programs:
    convs = convolution_dtypes(program.stablehlo)
    conv_text = ", ".join(f"{n} {t}" for t, n in convs.items()) if convs else "none"
    coll_text = (format_collectives(program.collectives) if program.collectives else
                 "none in the StableHLO: XLA's SPMD partitioner adds what the "
                 "shardings need when it compiles")
    lines.append(f"  {program.platform} {program.name}: {coll_text}; convolutions: "
                 f"{conv_text}.")
  paths = [path for program in result.programs for path in program.paths]
  if paths:
    lines.append(f"Wrote {len(paths)} files under {paths[0].parent.parent}: "
                 "<platform>/<program>.jax_exported (Exported.serialize()) and "
                 "<platform>/<program>.stablehlo.mlir.")
  return "\n".join(lines)
