"""Collective ops in the compiled HLO of one batch-norm layer on 8 CPU devices.

    python -m benchmarks.collectives          # all implementations
    python -m benchmarks.collectives --tiny   # the same on a smaller input

For jaxbn, flax.linen, flax.nnx, haiku and equinox, counts the all-reduce,
all-gather, reduce-scatter, collective-permute and all-to-all ops (an async
`*-start`/`*-done` pair counts once) in `jit(...).lower(...).compile()
.as_text()` of the training-mode forward and of forward + backward (VJP w.r.t.
input and parameters), in two settings:

* `shard_map` over `jax.make_mesh((8,), ('data',))`, batch split over 'data',
  parameters and state replicated, the library's cross-replica axis = 'data'
  (equinox: `vmap` over the local examples inside, axis names ('batch', 'data'));
* `jit` over arrays sharded on the batch axis, no axis name: GSPMD inserts
  the collectives.

Counts are of ops in the program, not bytes; XLA may combine independent
all-reduces, which is part of what is measured.
"""

from __future__ import annotations

import argparse
import os

# 8 virtual CPU devices; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks import _impls  # noqa: E402
from training import hlo  # noqa: E402

AXIS = "data"


def _shard_map_programs(impl, mesh, params, state, x, ct, check_vma):
  batch_spec = P(AXIS)

  def replicated(tree):
    return jax.tree.map(lambda _: P(), tree)

  forward = jax.shard_map(
      _impls.train_forward(impl, AXIS), mesh=mesh,
      in_specs=(replicated(params), replicated(state), batch_spec),
      out_specs=(batch_spec, replicated(state)), check_vma=check_vma)
  # Parameter cotangents are replicated (summed over devices) as in a
  # data-parallel step; with check_vma=False they come out per device.
  step = jax.shard_map(
      _impls.train_step(impl, AXIS), mesh=mesh,
      in_specs=(replicated(params), replicated(state), batch_spec, batch_spec),
      out_specs=(batch_spec, replicated(state),
                 replicated(params) if check_vma else P(AXIS), batch_spec),
      check_vma=check_vma)
  sharded = NamedSharding(mesh, batch_spec)
  x = jax.device_put(x, sharded)
  ct = jax.device_put(ct, sharded)
  return (jax.jit(forward).lower(params, state, x).compile().as_text(),
          jax.jit(step).lower(params, state, x, ct).compile().as_text())


def _jit_programs(impl, mesh, params, state, x, ct):
  sharded = NamedSharding(mesh, P(AXIS))
  x = jax.device_put(x, sharded)
  ct = jax.device_put(ct, sharded)
  forward = jax.jit(_impls.train_forward(impl))
  step = jax.jit(_impls.train_step(impl))
  return (forward.lower(params, state, x).compile().as_text(),
          step.lower(params, state, x, ct).compile().as_text())


ERRORS: dict[str, tuple[str, str]] = {}


def _error_text(error: Exception, where: str) -> str:
  """A short cell for the table; the message goes under it (once per text)."""
  message = " ".join(str(error).split())[:300]
  text = f"{type(error).__name__}: {message}"
  for label, (_, known) in ERRORS.items():
    if known == text:
      return label
  label = f"error {len(ERRORS) + 1}"
  ERRORS[label] = (where, text)
  return label


def count_for(impl, mesh, shape):
  """Collective counts of `impl` in both settings, or the error met."""
  x = jax.random.normal(jax.random.key(0), shape)
  ct = jax.random.normal(jax.random.key(1), shape)
  x, ct = impl.to_layout(x), impl.to_layout(ct)
  params, state = impl.init(x)
  row = {}
  for check_vma in (True, False):
    try:
      fwd, step = _shard_map_programs(impl, mesh, params, state, x, ct, check_vma)
      row["shard_map"] = (hlo.count_collectives(fwd),
                          hlo.count_collectives(step), check_vma)
      break
    except Exception as error:
      row["shard_map"] = (_error_text(
          error, f"{impl.name}, shard_map check_vma={check_vma}"), "", check_vma)
  try:
    fwd, step = _jit_programs(impl, mesh, params, state, x, ct)
    row["jit"] = (hlo.count_collectives(fwd), hlo.count_collectives(step))
  except Exception as error:
    row["jit"] = (_error_text(error, f"{impl.name}, jit over sharded arrays"), "")
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="smaller input (same counts)")
  parser.add_argument("--impls", help="comma-separated JAX implementation names")
  args = parser.parse_args(argv)
  if jax.device_count() < 8:
    raise SystemExit("needs 8 devices: run as its own process (XLA_FLAGS is set on "
                     "import) or with --xla_force_host_platform_device_count=8")
  mesh = jax.make_mesh((8,), (AXIS,))
  shapes = ((16, 4, 4, 8),) if args.tiny else ((64, 14, 14, 32), (256, 128))
  impl_names = tuple(args.impls.split(",")) if args.impls else None

  _harness.print_header("Collectives of one batch-norm layer, 8 CPU devices")
  rows = []
  for shape in shapes:
    for impl in _impls.jax_implementations(impl_names):
      row = count_for(impl, mesh, shape)
      shard_fwd, shard_step, check_vma = row["shard_map"]
      jit_fwd, jit_step = row["jit"]
      fmt = lambda c: c if isinstance(c, str) else c.summary()  # noqa: E731
      rows.append(["(" + ",".join(map(str, shape)) + ")", impl.name,
                   fmt(shard_fwd), fmt(shard_step), "yes" if check_vma else "no",
                   fmt(jit_fwd), fmt(jit_step)])
  notes = [f"{label} ({where}): {text}" for label, (where, text) in ERRORS.items()]
  _harness.print_table(
      "Collective ops in the compiled HLO (train mode)",
      ["x shape (global)", "implementation", "shard_map fwd", "shard_map fwd+bwd",
       "check_vma", "jit-sharded fwd", "jit-sharded fwd+bwd"], rows,
      "fwd+bwd includes the parameter cotangents summed over devices where the program "
      "returns them replicated (shard_map with check_vma=True; jit). check_vma 'no' "
      "means the library fails under check_vma=True and was counted with "
      "check_vma=False (per-device parameter cotangents, not summed: a data-parallel "
      "step needs one more all-reduce for them)."
      + "".join(f"\n\n{note}" for note in notes))


if __name__ == "__main__":
  main()
