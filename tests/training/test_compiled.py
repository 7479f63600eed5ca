"""Programs compiled by the GPU and TPU compilers on this CPU (no device).

Small programs (two conv + BN + ReLU layers, the MNIST CNN) compiled for two
H100s (XLA:GPU) and a TPU v5e 2x2 slice (libtpu) through `training.targets`:
what jaxbn's batch norm costs there against flax.linen.BatchNorm, that the
convolutions reach the convolution units (no im2col), and that
`train.py --compile_for` reports memory against the target's. Needs the
`compile` extra (jax[tpu], jax[cuda12]); skipped without it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import pytest

from jaxbn import linen as jaxbn_linen
from training import hlo
from training import compiling
from training import targets

TARGETS = ("h100:2", "tpu-v5e:2x2")
LAYERS = 2


def _all_devices_or_skip(spec: str):
  try:
    return targets.devices(spec)
  except RuntimeError as error:
    pytest.skip(str(error))


def _devices_or_skip(spec: str):
  return _all_devices_or_skip(spec)[:2]


class _NoNorm(nn.Module):
  use_running_average: bool = False
  momentum: float = 0.9
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.bfloat16

  def __call__(self, x):
    return x


class _ConvNormNet(nn.Module):
  norm: type
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    for _ in range(LAYERS):
      x = nn.Conv(32, (3, 3), use_bias=False, dtype=jnp.bfloat16)(x)
      x = self.norm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16,
                    axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return x


_NORMS = {"jaxbn": jaxbn_linen.BatchNorm, "flax": nn.BatchNorm, "none": _NoNorm}


def _compiled_step(spec: str, norm: str, parallelism: str) -> str:
  """Optimized HLO of a forward + backward step of `_ConvNormNet` over 2 devices."""
  return _compiled(spec, norm, parallelism).as_text()


@functools.cache
def _compiled(spec: str, norm: str, parallelism: str) -> jax.stages.Compiled:
  """A forward + backward step of `_ConvNormNet` over 2 devices, compiled for `spec`."""
  devices = _devices_or_skip(spec)
  mesh = jax.make_mesh((2,), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  axis_name = "data" if parallelism == "shard_map" else None
  net = _ConvNormNet(_NORMS[norm], axis_name=axis_name)
  example = jnp.zeros((1, 16, 16, 32), jnp.bfloat16)
  variables = jax.eval_shape(lambda: net.clone(axis_name=None).init(jax.random.key(0),
                                                                    example))

  def step(variables, x):
    def loss(params):
      y, updates = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      loss = jnp.mean(jnp.square(y.astype(jnp.float32)))
      if axis_name is not None:
        loss = jax.lax.pmean(loss, axis_name)
      return loss, updates
    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    return value, grads, updates

  if axis_name is not None:
    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(),
                         check_vma=False)
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  abstract = jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), variables)
  x = jax.ShapeDtypeStruct((16, 16, 16, 32), jnp.bfloat16, sharding=sharded)
  return jax.jit(step).lower(abstract, x).compile()


def _all_reduces(text: str) -> list[hlo.Collective]:
  return [c for c in hlo.collectives(text) if c.op == "all-reduce"]


@pytest.mark.parametrize("parallelism", ["gspmd", "shard_map"])
@pytest.mark.parametrize("spec", TARGETS)
def test_one_all_reduce_per_bn_layer_forward_and_backward(spec, parallelism):
  jaxbn_text = _compiled_step(spec, "jaxbn", parallelism)
  flax_text = _compiled_step(spec, "flax", parallelism)
  none_text = _compiled_step(spec, "none", parallelism)
  jaxbn, flax, none = (_all_reduces(t) for t in (jaxbn_text, flax_text, none_text))
  # At most one statistics all-reduce per layer and pass (the compiler may
  # combine neighbours into one), none left in a conditional branch, and
  # never more than flax's.
  assert 0 < len(jaxbn) - len(none) <= 2 * LAYERS
  assert not any(c.in_conditional for c in jaxbn)
  assert len(jaxbn) <= len(flax)


@pytest.mark.parametrize("spec", TARGETS)
def test_kernels_and_bytes_at_most_flax(spec):
  jaxbn_text = _compiled_step(spec, "jaxbn", "gspmd")
  flax_text = _compiled_step(spec, "flax", "gspmd")
  none_text = _compiled_step(spec, "none", "gspmd")
  assert len(hlo.kernels(jaxbn_text)) <= len(hlo.kernels(flax_text))
  # Unfused reductions are the signature of layouts cut by reshapes.
  assert not [k for k in hlo.kernels(jaxbn_text) if k.op == "reduce"]
  jaxbn_share = hlo.entry_bytes(jaxbn_text) - hlo.entry_bytes(none_text)
  flax_share = hlo.entry_bytes(flax_text) - hlo.entry_bytes(none_text)
  assert 0 < jaxbn_share <= flax_share


def _bytes_accessed_as_the_tpu_cost_model_counts(text: str) -> int:
  """Every kernel's operands and result in any memory space, each copy-start 4x, slices once."""
  entry = hlo.instructions(hlo.computations(text)[hlo.entry_name(text)])
  shapes = {inst.name: inst.shape for inst in entry}
  kernels = {inst.name for inst in hlo.kernels(text)}
  total = 0
  for inst in entry:
    if inst.op == "copy-start":  # its operand, the (source, destination) result, copy-done
      total += 4 * hlo.stored_bytes(shapes[inst.operands[0]])
    elif inst.op == "slice-done":
      total += hlo.stored_bytes(inst.shape)
    elif inst.name in kernels:
      total += hlo.stored_bytes(inst.shape) + sum(hlo.stored_bytes(shapes.get(operand, ""))
                                                  for operand in inst.operands)
  return total


@pytest.mark.parametrize("norm", ["jaxbn", "flax"])
def test_tpu_bytes_accessed_counts_on_chip_memory_and_each_copy_four_times(norm):
  """What the TPU compiler's "bytes accessed" is, and why `hlo.hbm_traffic_bytes` reports beside it.

  The account below reproduces the compiler's figure: all kernels' operands and
  results, on-chip (VMEM) ones included, and each async copy four times; HBM
  traffic, where each array is kept, is much less.
  """
  compiled = _compiled("tpu-v5e:2x2", norm, "gspmd")
  text = compiled.as_text()
  reported = compiled.cost_analysis()["bytes accessed"]
  assert " copy-start(" in text and "S(1)" in text  # the memory-space assignment ran
  assert _bytes_accessed_as_the_tpu_cost_model_counts(text) == pytest.approx(reported, rel=0.01)
  assert hlo.async_copy_bytes(text) > 0
  assert 0 < hlo.hbm_traffic_bytes(text) < 0.5 * reported


def test_gpu_hbm_traffic_is_the_kernels_operand_and_result_bytes():
  text = _compiled_step("h100:2", "jaxbn", "gspmd")
  assert "S(1)" not in text and hlo.async_copy_bytes(text) == 0
  assert hlo.hbm_traffic_bytes(text) == hlo.entry_bytes(text)


def _mnist_config(parallelism: str, half_precision: bool, batch: int = 16):
  from configs import mnist_bn
  config = mnist_bn.get_config()
  config.dataset, config.image_size, config.num_classes = "synthetic", 28, 10
  config.num_train_examples = 1024
  config.parallelism, config.half_precision = parallelism, half_precision
  config.batch_size = config.eval_batch_size = batch
  return config


@pytest.mark.parametrize("spec", TARGETS)
def test_cnn_convolutions_reach_the_convolution_units(spec):
  """bf16 + shard_map: the CNN's convolutions stay convolutions (no im2col matmuls)."""
  _devices_or_skip(spec)
  (train,) = compiling.compile_config(_mnist_config("shard_map", True),
                                      targets.parse(spec)[0], programs=("train_step",))
  # Two conv layers: two forward convolutions, two kernel gradients and the
  # input gradient of the second (the first's input is data).
  assert train.convolutions >= 5
  assert "concatenate" not in {k.op for k in hlo.kernels(train.hlo_text)}


def test_compile_for_reports_memory_against_the_target(tmp_path):
  _devices_or_skip("h100:2")
  result = compiling.compile_for_targets(_mnist_config("gspmd", True), tmp_path, "h100:2")
  train, evaluate = result.programs
  assert result.fits and train.fits and evaluate.fits
  assert 0 < train.peak_bytes < train.hbm_bytes == targets.TARGETS["h100"].hbm_bytes
  assert train.temp_bytes > 0 and train.flops > 0 and train.nbytes > 0
  assert "h100:2 train_step (2 devices, 8 per device): fits: peak" in result.summary
  # One memory space on GPUs: the HBM traffic is the kernels' bytes, said once.
  assert train.hbm_traffic_bytes == train.nbytes and "HBM traffic" not in result.summary
  assert (tmp_path / "compiled" / "h100_2" / "train_step.hlo.txt").read_text().startswith(
      "HloModule")
  # 2**24 MNIST images per device: far more than 80 GB of activations.
  too_big = compiling.compile_for_targets(
      _mnist_config("gspmd", True, batch=2 * 2**24), None, "h100:2")
  assert not too_big.fits and "DOES NOT FIT" in too_big.summary


def test_compile_for_reports_tpu_hbm_traffic_beside_the_compilers_bytes():
  _devices_or_skip("tpu-v5e:2x2")
  result = compiling.compile_for_targets(_mnist_config("gspmd", True), None, "tpu-v5e:2x2")
  train = result.programs[0]
  assert train.bytes_method == "compiler bytes accessed"
  assert 0 < train.hbm_traffic_bytes < train.nbytes
  assert f"HBM traffic by memory space {hlo.fmt_bytes(train.hbm_traffic_bytes)}" in (
      result.summary)


def test_target_parsing_errors_name_the_flag():
  assert [s.label for s in targets.parse("h100:8, tpu-v5p:4x4x4")] == [
      "h100:8", "tpu-v5p:4x4x4"]
  with pytest.raises(ValueError, match="unknown target 'v100'"):
    targets.parse("v100:8")
  with pytest.raises(ValueError, match="needs a topology"):
    targets.parse("tpu-v5e:8")
  with pytest.raises(ValueError, match="needs a topology"):
    targets.parse("h100")


def test_tpu_v4_runs_one_device_per_chip():
  """v4 (like v5p) is compiled for as JAX runs it: each chip's two cores as one device."""
  devices = _all_devices_or_skip("tpu-v4:2x2x2")
  assert len(devices) == 8  # 8 chips, not 16 cores
  assert len({d.process_index for d in devices}) == 2  # 4 chips per host
  mesh = jax.make_mesh((8,), ("data",), devices=devices)  # rejects per-core devices
  x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  compiled = jax.jit(lambda x: jnp.sum(x, 0)).lower(x).compile()
  assert hlo.count_collectives(compiled.as_text()).summary().startswith("1 (1 all-reduce")


_MODULE = """HloModule m

%branch (p: f32[64]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  ROOT %all-reduce.2 = f32[64]{0} all-reduce(%p), channel_id=2, to_apply=%add
}

ENTRY %main (x: bf16[8,16]) -> f32[64] {
  %x = bf16[8,16]{1,0:T(8,128)(2,1)} parameter(0)
  %conv = (bf16[8,16]{1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convForward"
  %y = bf16[8,16]{1,0} get-tuple-element(%conv), index=0
  %sums = f32[64]{0} fusion(%y), kind=kInput, calls=%fused
  %all-reduce-start = f32[64]{0} all-reduce-start(%sums), channel_id=1, to_apply=%add
  %all-reduce-done = f32[64]{0} all-reduce-done(%all-reduce-start)
  %c = s32[] constant(0)
  ROOT %r = f32[64]{0} conditional(%c, %all-reduce-done), branch_computations={%branch}
}
"""


def test_hlo_reader_on_a_fixed_module():
  assert [k.op for k in hlo.kernels(_MODULE)] == ["custom-call", "fusion", "all-reduce-start"]
  # custom-call: 2 x 256 B in, 256 B out (tuple); fusion: 256 B in, 256 B out;
  # all-reduce-start: its 256 B operand once.
  assert hlo.entry_bytes(_MODULE) == 3 * 256 + 2 * 256 + 256
  assert hlo.collectives(_MODULE) == (
      hlo.Collective("all-reduce", 256, True, ""), hlo.Collective("all-reduce", 256, False, ""))
  assert hlo.count_collectives(_MODULE).summary() == (
      "2 (2 all-reduce); 1 in a lax.cond branch")
  assert hlo.convolutions(_MODULE) == 1
  assert hlo.shape_bytes("(f32[64]{0:T(128)}, bf16[2,3]{1,0:T(8,128)(2,1)})") == 268
  assert hlo.fmt_bytes(1.5e9) == "1.50 GB"


def test_compile_for_with_grad_accum_counts_every_microbatch():
  """The compilers count a loop body once: k microbatches cost k one-microbatch steps."""
  _devices_or_skip("h100:2")
  spec = targets.parse("h100:2")[0]
  config = _mnist_config("gspmd", True, batch=32)
  config.grad_accum_steps = 2
  (accumulated,) = compiling.compile_config(config, spec, programs=("train_step",))
  micro = _mnist_config("gspmd", True, batch=16)
  (one,) = compiling.compile_config(micro, spec, programs=("train_step",))
  assert accumulated.per_device_batch == 16
  assert accumulated.flops == pytest.approx(2 * one.flops)
  assert accumulated.nbytes == pytest.approx(2 * one.nbytes)
  assert "2 x one microbatch" in accumulated.bytes_method
  # The largest fitting batch is a whole number of microbatches per device.
  assert compiling.largest_fitting_batch(config, spec, limit=16) == 16
