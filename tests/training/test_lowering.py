"""train.py --lower_for: the train and eval steps exported for GPUs and TPUs on CPU.

Lowering only (jax.export, no compilation) of what `train_and_evaluate` builds,
on the 8 virtual CPU devices of conftest, and checks of what the StableHLO
holds: BN all-reduces under shard_map (one per BN layer in the forward pass,
one more in the backward pass), bf16 convolutions in half precision,
`lax.conv` (not the CPU's im2col) for cuda and tpu, and the mesh's device
count; under gspmd, the collectives of the compiled program (XLA:GPU without a
device, when the compile extra is installed).
"""

import functools
import importlib
import re
import subprocess
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from tests.training import _train_utils as utils
from training import distributed
from training import input_pipeline
from training import compiling
from training import lowering
from training import optimizers
from training import steps
from training import targets
from training import train_state

ACCELERATORS = ("cuda", "tpu")


def _num_bn_layers(bn_state) -> int:
  """BN layers of a model: one running mean each."""
  return sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(bn_state)
             if jax.tree_util.keystr(path).endswith(("mean", "'mean']")))


def _by_purpose(program):
  counts = {}
  for collective in program.collectives:
    key = (collective.purpose, collective.op)
    counts[key] = counts.get(key, 0) + 1
  return counts


def check_lowered(result: lowering.Lowering, config, bn_state) -> None:
  """The checks every lowered config must pass.

  Under gspmd (and in every eval step) the StableHLO holds no collective: the
  SPMD partitioner inserts them when it compiles, which
  `test_gspmd_collectives_appear_when_compiled` checks on compiled programs.
  """
  num_bn = _num_bn_layers(bn_state)
  num_params = result.num_parameters
  dtype = "bf16" if config.half_precision else "f32"
  assert result.num_devices == 8
  assert {(p.platform, p.name) for p in result.programs} == {
      (platform, name) for platform in ACCELERATORS for name in lowering.PROGRAMS}
  for program in result.programs:
    where = f"{program.platform} {program.name}"
    assert program.exported.nr_devices == 8, where
    # lax.conv, not im2col, in the activations' dtype.
    convolutions = lowering.convolution_dtypes(program.stablehlo)
    assert set(convolutions) == {dtype}, (where, convolutions)
    counts = _by_purpose(program)
    if program.name == "train_step" and config.parallelism == "shard_map":
      assert counts[("batch norm forward", "all_reduce")] == num_bn, (where, counts)
      assert counts[("batch norm backward", "all_reduce")] == num_bn, (where, counts)
      # The gradient mean: one all-reduce per parameter array (XLA combines
      # them when it compiles), the loss, and the correct-prediction count.
      num_param_arrays = len(jax.tree.leaves(result.programs[0].exported.in_tree.unflatten(
          result.programs[0].exported.in_avals)[0][0].params))
      assert counts[("gradients, loss, metrics", "all_reduce")] == num_param_arrays + 2
      assert set(counts) == {("batch norm forward", "all_reduce"),
                             ("batch norm backward", "all_reduce"),
                             ("gradients, loss, metrics", "all_reduce")}, where
      grad_bytes = sum(c.nbytes for c in program.collectives
                       if c.purpose == "gradients, loss, metrics")
      assert grad_bytes == 4 * num_params + 4 + 4, where  # f32 grads, loss, count
  assert f"parallelism={config.parallelism}" in result.summary


def _batch_stats(config):
  """The shapes of the `batch_stats` of `config`'s model."""
  info = lowering.dataset_info(config)
  model = train_state.create_model(config, info)
  return jax.eval_shape(lambda key: model.init(
      key, jnp.zeros((1,) + info.image_shape), train=False), jax.random.key(0))["batch_stats"]


@pytest.fixture(scope="module")
def mnist_cnn_bn_state():
  config = utils.tiny_config()
  return _batch_stats(config)


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
@pytest.mark.parametrize("half_precision", [False, True])
def test_mnist_cnn_lowers_for_cuda_and_tpu(tmp_path, mnist_cnn_bn_state, parallelism,
                                          half_precision):
  config = utils.tiny_config(parallelism=parallelism, half_precision=half_precision)
  result = lowering.lower_for_platforms(config, tmp_path, "cuda,tpu")
  check_lowered(result, config, mnist_cnn_bn_state)
  assert result.num_parameters == 38_520  # the MNIST CNN without biases before BN
  for platform in ACCELERATORS:
    for name in lowering.PROGRAMS:
      exported = lowering.deserialize_exported(
          tmp_path / "lowered" / platform / f"{name}.jax_exported", config)
      assert exported.nr_devices == 8
      assert lowering.convolution_dtypes(exported.mlir_module()) == (
          lowering.convolution_dtypes(
              (tmp_path / "lowered" / platform / f"{name}.stablehlo.mlir").read_text()))


def test_platform_decides_the_convolution(tmp_path):
  """Lowered on this CPU: im2col for cpu, lax.conv for cuda (one program each).

  The CPU program's convolutions are matmuls (`ops.conv_matmuls`; the
  first layer's transposed convolution for its input gradient is dead code).
  """
  config = utils.tiny_config()
  result = lowering.lower_for_platforms(config, None, ["cpu", "cuda"])
  train = {p.platform: p.stablehlo for p in result.programs if p.name == "train_step"}
  assert not lowering.convolution_dtypes(train["cpu"])
  assert "stablehlo.dot_general" in train["cpu"]
  assert lowering.convolution_dtypes(train["cuda"])["f32"] == 5  # 2 fwd + 3 bwd


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
def test_gspmd_collectives_appear_when_compiled(parallelism):
  """Compiled for 2 H100s: the BN statistics' all-reduces are in the train step.

  Under gspmd the partitioner inserts them (the StableHLO has none); the eval
  step (running statistics) all-reduces only its scalar sums. Skipped without
  the compile extra.
  """
  try:
    spec = targets.parse("h100:2")[0]
    targets.devices(spec)
  except RuntimeError as error:
    pytest.skip(str(error))
  config = utils.tiny_config(parallelism=parallelism, batch_size=16, eval_batch_size=16)
  train, evaluate = compiling.compile_config(config, spec)
  train_bytes = [c.nbytes for c in train.collectives if c.op == "all-reduce"]
  eval_bytes = [c.nbytes for c in evaluate.collectives if c.op == "all-reduce"]
  # BN statistics: per-channel f32 vectors (32 channels: >= 128 bytes each).
  assert sum(1 for b in train_bytes if 128 <= b < 4096) >= 1, train_bytes
  assert eval_bytes and max(eval_bytes) <= 64, eval_bytes  # loss, correct, examples
  assert not any(c.in_conditional for c in train.collectives)


def test_exported_cpu_train_step_runs_like_the_jitted_step(tmp_path):
  """The serialized module, deserialized and run, is the training step.

  (The BN paper's MLP: it compiles faster than the CNN.)
  """
  config = utils.tiny_config(parallelism="shard_map", model="mlp")
  lowering.lower_for_platforms(config, tmp_path, ["cpu"])
  exported = lowering.deserialize_exported(
      tmp_path / "lowered" / "cpu" / "train_step.jax_exported", config)

  mesh = distributed.create_mesh(0)
  info = lowering.dataset_info(config)
  model = train_state.create_model(config, info)
  tx = optimizers.create_optimizer(config, 8)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(distributed.AXIS))
  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    input_shape=info.image_shape),
                  out_shardings=replicated)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = input_pipeline.Batch(
      rng.integers(0, 256, size=(64, 28, 28, 1), dtype=np.uint8),
      rng.integers(0, 10, size=64).astype(np.int32), np.ones(64, bool))
  batch = input_pipeline.to_global(batch, batch_sharding, 64)
  expected = steps.make_train_step(config, mesh, model, tx)(
      jax.tree.map(jnp.copy, state), batch)
  got = exported.call(state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               got, expected)
  assert int(got.step) == 1


def test_train_py_lower_for_exits_without_training(tmp_path):
  completed = subprocess.run(
      utils.train_command(tmp_path, "--lower_for=cuda,tpu",
                          "--config.parallelism=shard_map"),
      cwd=utils.REPO, env=utils.subprocess_env(8), capture_output=True, text=True,
      timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  out = completed.stdout
  assert "8 device(s), parallelism=shard_map" in out, out
  assert re.search(r"cuda train_step: 3 all_reduce for batch norm forward", out), out
  assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                if p.is_file()) == sorted(
      f"lowered/{platform}/{name}.{ext}" for platform in ACCELERATORS
      for name in lowering.PROGRAMS for ext in ("jax_exported", "stablehlo.mlir"))


@pytest.mark.parametrize("text", ["", "gpu", "cuda,cuda", "cuda,metal"])
def test_bad_platform_lists_are_refused(text):
  with pytest.raises(ValueError, match="lower_for must be"):
    lowering.parse_platforms(text)


def test_counts_and_bytes_of_a_collective():
  text = textwrap.dedent('''
    %3 = "stablehlo.all_reduce"(%2) <{replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>}> ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %s = stablehlo.add %a, %b : tensor<f32> loc(#loc2)
      stablehlo.return %s : tensor<f32> loc(#loc2)
    }) : (tensor<2x64xf32>) -> tensor<2x64xf32> loc(#loc1)
    #loc1 = loc("jvp()/psum"(#loc3))
    #loc2 = loc(unknown)
    #loc3 = loc("/site-packages/jaxbn/_stats.py":10:2)
  ''')
  assert lowering.collectives(text) == (
      lowering.Collective("all_reduce", "batch norm forward", 512),)
  assert lowering.tensor_bytes("3x5xbf16") == 30


def _config(name, **overrides):
  """configs/<name>.py with `overrides`."""
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides.items():
    config[key] = value
  return config


RESNET_CASES = {
    # configs/resnet_imagenet.py: ResNet-50, 224x224 crops, global batch 1024.
    "resnet50-shard_map-bf16": ("resnet_imagenet", "shard_map", True),
    "resnet50-gspmd-f32": ("resnet_imagenet", "gspmd", False),
    # As shipped.
    "resnet50-gspmd-bf16": ("resnet_imagenet", "gspmd", True),
    # configs/resnet_cifar.py: ResNet-20 on CIFAR-10, batch 128.
    "resnet20-shard_map-f32": ("resnet_cifar", "shard_map", False),
    "resnet20-gspmd-bf16": ("resnet_cifar", "gspmd", True),
}


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_resnets_lower_for_cuda_and_tpu(case):
  config_name, parallelism, half_precision = RESNET_CASES[case]
  config = _config(config_name, parallelism=parallelism, half_precision=half_precision)
  result = lowering.lower_for_platforms(config, None, ACCELERATORS)
  info = lowering.dataset_info(config)
  bn_state = _batch_stats(config)
  check_lowered(result, config, bn_state)
  expected = {"resnet50": (53, 25_557_032, (224, 224, 3)),
              "resnet20": (19, 269_722, (32, 32, 3))}[config.model]
  assert (_num_bn_layers(bn_state), result.num_parameters, info.image_shape) == expected
